// Package bpf holds the eBPF side of hostd's network dataplane: the C source
// of the TC programs that implement VirtualWire connectors (connector.c) and
// the Go bindings bpf2go generates from it. It contains no logic of its own;
// hostd/dataplane loads these objects, attaches them and fills their maps.
//
// The contract between C and Go is the set of maps:
//   - endpoints: local endpoint ifindex -> {connector id, flags, peer ifindex,
//     remote and local underlay address}; read on every frame a VM sends.
//   - deliveries: VNI (= connector id) -> {local endpoint ifindex, the peer
//     host allowed to send}; read on every frame the host's VXLAN device
//     decapsulates.
//   - counters: connector id -> per-CPU packet, byte and drop counters.
//
// The loader sets the constant vxlan_ifindex before loading.
package bpf
