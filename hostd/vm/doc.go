// Package vm is hostd's VM manager: it turns the scheduler's requests into
// domain specs for the second-layer hypervisor (xen.Hypervisor), keeps one
// record per VM in the store, follows each guest to readiness, and
// reconciles its records with what the hypervisor really runs.
//
// The hypervisor is the source of truth for run state; the store is the
// source of truth for what hostd owns and what it knows beyond libvirt
// (creation time, measured boot time). A domain that carries hostd's spec in
// its metadata but has no record (the store was lost) is adopted; a record
// whose domain is gone is marked vanished, never silently deleted.
package vm
