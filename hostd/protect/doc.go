// Package protect is hostd's side of the memory plane: it keeps the VMs
// created with served memory backed by a memory server each (package
// checkpoint/memserver), turns protection requests into continuous
// checkpointing to a backup, runs evacuations (pause, final flush, device
// state, restorable commit) as jobs with per-phase reports, takes
// crash-consistent epochs at a VM's epoch interval, shares the host's
// backup bandwidth among protected VMs by weight, and restores VMs from a
// backup (lazily or in full).
//
// Where it sits: the API (package api) calls Manager; Manager drives the
// hypervisor (pause, resume, device state through xen/qemu), the memory
// servers (over their control sockets) and package vm (which owns domain
// lifecycle and asks Memories, through the vm.Memory seam, for a RAM file).
// The memory servers, not hostd, hold the FUSE mounts: hostd may crash or
// restart while guests run and keep being checkpointed; the next hostd
// re-attaches to them (Manager.Resume).
package protect
