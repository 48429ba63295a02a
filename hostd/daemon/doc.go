// Package daemon wires hostd together: configuration, state store,
// hypervisor driver, VM manager, job registry, event broker, metrics and the
// socket API, and runs them until the process is told to stop.
//
// Stopping never stops guests: VMs are processes of the hypervisor, not of
// hostd, and a new daemon adopts them (vm.Manager.Reconcile). That is what
// makes a restart, an upgrade or a kill -9 harmless to the guests.
package daemon
