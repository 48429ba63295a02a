// Package hostd is the root of the host agent: the daemon that owns the
// nested VMs of one blanket host and serves an external scheduler through a
// local unix socket.
//
// Layout, from the outside in:
//
//	cmd/hostd    the daemon binary; cmd/hostctl the CLI
//	daemon       wires configuration, store, hypervisor, VM manager and API
//	api          REST/JSON over the unix socket (openapi.yaml is its contract)
//	client       the Go client of that API (hostctl and the tests use it)
//	vm           the VM manager: domain specs, lifecycle, reconciliation
//	jobs         long operations with IDs, progress and final reports
//	events       the newline-delimited JSON event stream
//	store        the embedded state store (bbolt) under the state directory
//	config       the one configuration file and its defaults
//
// The second-layer hypervisor lives in ../xen, the memory plane in
// ../checkpoint and the network dataplane in ../dataplane.
package hostd
