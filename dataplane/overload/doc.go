// Package overload is the overload policy of cooperative swap
// (Overdriver, issue 6), as pure logic: fed the paging operations of one
// VM's swap device every interval, it says when an overload starts, when a
// transient one ends, and when one has become sustained, which is when the
// scheduler should migrate the VM. It keeps no clock of its own: each
// Sample carries its time and interval, so tests feed synthetic time.
//
// Rules (Overdriver, design.md "Cooperative swap"):
//   - an interval is overloaded when its rate is above RateThreshold
//     (200 ops/s);
//   - an overload (episode) starts with an overloaded interval and ends
//     after QuietIntervals intervals in a row that are not;
//   - it becomes sustained when Required of the last Window intervals were
//     overloaded (8 of 12: oscillating overloads are sustained too), or
//     when it outlasts the migration threshold;
//   - the threshold starts at InitialThreshold (120 s); once MinSamples
//     transient overloads have ended, it is mean + 3 standard deviations of
//     their durations, if that is lower;
//   - Reset after a migration: the VM's overload profile changes with its
//     new resources, so the learning starts again.
//
// Wiring (hostd): one Policy per VM with a swap device; every 10 s
//
//	st := dev.Stats()
//	pages := (st.ReadBytes + st.WriteBytes) / swapdev.PageSize // paging operations
//	events := pol.Observe(overload.Sample{At: now, Interval: now.Sub(last), Ops: pages - lastPages})
//
// and publish each Event on the event stream (Kind is the event type);
// after a migration of the VM, pol.Reset().
package overload
