// Package protect benchmarks the memory plane with real guests through a
// real hostd: evacuations against their bound over a throttled link to a
// backup in its own network namespace, the guest workload cost of
// protection, crash-consistent epoch pauses, and how many dirtying guests
// one backup keeps within their bound. `make bench-checkpoint` runs it.
package protect
