// Package dataplane implements VirtualWire connectors for hostd: point-to-
// point layer-2 links between two vNICs, identified by an ID and carried as
// VXLAN (VNI = connector ID) over the hosts' underlay network.
//
// Each host configures only its own endpoints, from what the scheduler tells
// it; there is no central database. A Connector names both endpoints; the
// host whose underlay address matches an endpoint attaches that endpoint's
// device (the VM's tap). When both ends are on one host the connector
// collapses to a direct tap-to-tap path without encapsulation.
//
// Two backends sit behind the Dataplane interface, chosen by Config.Backend:
//   - BackendEBPF: one VXLAN device per host in external (collect-metadata)
//     mode and the TC programs of hostd/bpf; moving an endpoint rewrites one
//     map entry per host.
//   - BackendNetdev: no eBPF; one classic VXLAN netdev per connector, joined
//     to the tap by tc mirred redirects.
//
// With Config.PinPath (eBPF) the maps are pinned on a bpffs: connectors keep
// forwarding while hostd restarts, and the next New adopts them.
//
// RateLimiter throttles a device (per-VM backup and migration traffic), and
// NewCollector exports connector counters to Prometheus. hostd's daemon
// (hostd/) owns the instances and maps its API onto them.
//
// The tests (root; go test ./dataplane/) build hosts and VMs out of network
// namespaces they create and delete: hosts joined by an underlay bridge, VMs
// whose eth0 is a veth into their host standing in for a tap, and send real
// frames through kernel VXLAN and the eBPF programs, table-driven over both
// backends. `make bench-dataplane` runs the benchmarks in bench_test.go.
package dataplane
