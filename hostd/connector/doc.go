// Package connector is the daemon's side of VirtualWire connectors: the
// scheduler names a connector's endpoints as (host, VM, NIC), and this
// package resolves the endpoints on this host to the VMs' taps, asks the
// dataplane (../../dataplane) to configure them, keeps a record of each
// connector in the store, and publishes connector events.
//
// Each hostd configures only its own endpoints, from what the scheduler
// tells it: there is no central database. To move a VM, the scheduler
// updates the connector on the hosts involved (Update on the peer's host
// and the new host, Delete on the old one); the logical port stays the
// same, so guests need no ARP.
package connector
