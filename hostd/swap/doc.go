// Package swap owns the host's cooperative swap devices (issue 6,
// Overdriver): one per VM, made by PUT /v1/vms/{name}/swap.
//
// A device is a dataplane/swapdev.Device (pages in peers' repositories,
// written through to <vm dir>/swap.img) served by a dataplane/nbd server on
// a unix socket under the run directory, and hot-plugged into the running
// domain as a virtio disk (libvirt AttachDevice, live only) whose serial
// is SerialNumber, so the guest finds it (the agent's swapon) whatever name
// its kernel gives it. Hot-plug rather than a disk in the definition:
// swap is added to and removed from running VMs, the definition (and its
// spec metadata, which adoption reads) stays what the VM was created with,
// and i440fx's ACPI PCI hotplug works with libvirt 9 + QEMU 7.2 and the
// Debian cloud kernel (HOTPLUG_PCI_ACPI=y).
//
// Every SampleInterval a sampler feeds the device's paging operations (4
// KiB pages read or written) to the VM's overload.Policy and publishes its events (overload_started,
// overload_transient_ended, overload_sustained, overload_sustained_ended)
// on the event stream.
//
// Lifetimes. A device ends with DELETE (the disk is unplugged first: the
// guest must swapoff before, or its swapped pages are lost to it), when
// its VM stops or is deleted, and, for hostd itself, at a graceful stop,
// where the device is flushed and closed but stays plugged: the disk
// carries nbd reconnect-delay (swap.reconnect_delay), so QEMU holds its
// requests while hostd is away, and Resume at the next start reopens the
// file with Reuse (every page read from the local file; the repositories'
// copies are forgotten and reaped by them) and serves the same socket. A
// hostd killed with -9 loses the pages still queued for the local file
// (a volatile write cache, bounded by the guest's flushes); the page map
// is in memory only, so nothing else is recoverable from the repositories.
package swap
