// Package swap benchmarks cooperative swap through a real hostd (issue 6):
// a guest's workload while its VM is ballooned below its working set and
// pages to its cooperative swap device, whose pages live in a repo-role
// hostd in its own network namespace (mutual TLS over a veth). `make
// bench-swap` runs it beside the device figures of dataplane/swapdev
// (coopswap_*_vs_disk).
//
// One 256 MiB guest swaps on its device; its agent runs an unpaced,
// swappable dirty workload over 160 MiB. The workload's pages/s (agent
// Ops, measure long) is taken well provisioned (all of it resident), then
// again after the balloon is set to 112 MiB and the overload policy has
// reported overload_started (the guest pages through the device: the
// transient overload), and the balloon is given back, which ends it.
//
// Figures (`bench: NAME VALUE UNIT`):
//
//   - overload_workload_ratio: pages/s during the overload over pages/s
//     well provisioned, measured in the same run.
//   - overload_transient_s: the overload's duration as the policy's
//     overload_transient_ended event reports it (the default 10 s sampling
//     and 200 ops/s threshold).
package swap
