// Package xen is hostd's second-layer hypervisor: the "blanket" that runs
// nested VMs inside a rented VM (the name is XenBlanket's; the package is the
// home of whichever hypervisor serves the blanket).
//
// The rest of hostd sees only the Hypervisor interface and the plain types in
// this package (DomainSpec, DomainInfo, ...). Drivers sit side by side in
// subpackages: xen/libvirt drives QEMU/KVM, QEMU/TCG and (later) Xen/libxl
// through libvirt. Nothing above this package builds libvirt XML or speaks to
// a QEMU monitor; the checkpoint and restore code that needs QEMU-specific
// operations reaches them through the Monitor interface, the one small place
// where QMP passes through libvirt, and its typed helpers in xen/qemu.
package xen
