// Package libvirt is hostd's second-layer hypervisor driver for libvirt: it
// implements xen.Hypervisor (and xen.Monitor) on QEMU/KVM or QEMU/TCG through
// libvirtd, typically at qemu:///system.
//
// The walk through the package, in the order a domain lives:
//
//   - driver.go: New and Config. New connects, reads the host's limits and
//     resolves the accelerator (probe.go boots a real kernel under KVM to see
//     whether KVM really works here; TCG otherwise).
//   - spec.go: every DomainSpec is validated and normalised (UUID, MACs,
//     disk targets filled in) before libvirt sees it.
//   - domxml.go: DomainSpec to libvirt XML with libvirtxml, including guest
//     RAM as a shared memory-backend-file at spec.RAMPath (through
//     <qemu:commandline>, so that a restore can name the same file) and the
//     spec itself in <metadata>, so a restarted hostd can adopt its domains.
//   - lifecycle.go, query.go: the Hypervisor methods.
//   - events.go: libvirt lifecycle events fanned out to subscribers.
//   - monitor.go: the QMP passthrough (xen.Monitor) that xen/qemu's
//     checkpoint helpers build on.
//   - session.go: the connection. libvirtd may restart under hostd; calls
//     made while it is away fail at once with xen.ErrUnavailable, the next
//     call after it returns reconnects, and event callbacks are registered
//     again on the new connection.
//
// Every libvirt call runs on its own goroutine so the caller's context bounds
// the wait even when libvirtd does not answer; the call itself cannot be
// cancelled and finishes in the background.
package libvirt
