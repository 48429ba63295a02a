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
// where the device is flushed and closed but stays plugged; Resume at the
// next start reopens the file with Reuse (every page read from the local
// file; the repositories' copies are forgotten and reaped by them) and
// serves the same socket, and QEMU reconnects to it at the disk's next
// request (TestSwapSurvivesHostdRestart).
//
// What does not survive yet: requests in flight while no hostd serves the
// socket. The disk asks for QEMU's NBD reconnect-delay
// (swap.reconnect_delay, <reconnect delay=N/> in the disk XML), which
// would hold them until the new hostd answers, but libvirt 9.0 (Debian
// 12's) drops that element (its schema has none for NBD sources; it
// came in a later release). Seen here: a guest that swapped through a
// hostd restart lost pages (its agent was killed). Until the blanket's libvirt honours it (or the disk is plugged
// with blockdev-add through the QEMU monitor, which takes reconnect-delay
// directly), have the guest swapoff before a planned restart. A hostd
// killed with -9 also loses the pages still queued for the local file (a
// volatile write cache, bounded by the guest's flushes); the page map is
// in memory only, so nothing is recoverable from the repositories.
package swap
