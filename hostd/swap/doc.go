// Package swap owns the host's cooperative swap devices (issue 6,
// Overdriver): one per VM, made by PUT /v1/vms/{name}/swap.
//
// A device is a dataplane/swapdev.Device (pages in peers' repositories,
// written through to <vm dir>/swap.img) served by a dataplane/nbd server on
// a unix socket under the run directory, and hot-plugged into the running
// domain as a virtio disk whose serial is SerialNumber, so the guest finds
// it (the agent's swapon) whatever name its kernel gives it. Hot-plug
// rather than a disk in the definition: swap is added to and removed from
// running VMs, and the definition (and its spec metadata, which adoption
// reads) stays what the VM was created with; i440fx's ACPI PCI hotplug
// works with QEMU 7.2 and the Debian cloud kernel (HOTPLUG_PCI_ACPI=y).
// The disk is plugged through the QEMU monitor (blockdev-add of an nbd
// node with reconnect-delay, then device_add of a virtio-blk-pci on it):
// libvirt 9.0 (Debian 12's) would attach the same disk from XML but drops
// its <reconnect delay/> (its schema has none for NBD sources; it came in
// a later release), and without it QEMU fails the requests that meet a
// restarting hostd, which the guest sees as lost swap pages (seen here:
// its agent was killed). libvirt then reports the domain tainted
// (custom monitor). Hypervisors without a QEMU monitor get
// xen.Hypervisor.AttachDisk (target vdz).
//
// Every SampleInterval a sampler feeds the device's paging operations (4
// KiB pages read or written) to the VM's overload.Policy and publishes its events (overload_started,
// overload_transient_ended, overload_sustained, overload_sustained_ended)
// on the event stream.
//
// Lifetimes. A device ends with DELETE (the disk is unplugged first: the
// guest must swapoff before, or its swapped pages are lost to it), when
// its VM stops or is deleted, and, for hostd itself, at a graceful stop,
// where the device is flushed and closed but stays plugged: QEMU holds the
// disk's requests for swap.reconnect_delay, and Resume at the next start
// reopens the file with Reuse (every page read from the local file; the
// repositories' copies are forgotten and reaped by them) and serves the
// same socket (TestSwapThroughHostdRestart: the guest pages through a
// restart). A disk plugged through AttachDisk has no reconnect delay on
// libvirt 9.0: the request that meets the restart fails in the guest, so
// the guest must swapoff first (TestSwapSurvivesHostdRestart, which also
// runs on the monitor path). A hostd killed with -9 loses the pages still
// queued for the local file (a volatile write cache, bounded by the
// guest's flushes); the page map is in memory only, so nothing is
// recoverable from the repositories.
package swap
