// Package flush is the per-VM flush controller: the arithmetic of bounded
// time (design.md, "Bounded time, the arithmetic"). From the measured
// bandwidth B to the backup, the bound T (the provider's warning), the
// estimated times to pause the VM, save its device state and commit, and a
// safety factor, it derives the dirty cap
//
//	D = (T - t_pause - t_state - state_bytes/B - t_commit) * B * safety
//
// and hands it to the VM's memfs (SetDirtyCap), which makes the kernel hold
// the guest's unflushed memory under D whatever the guest's dirty rate. It
// re-derives D as B changes and tightens it once a termination notice
// arrives (as SpotCheck does, to shrink the final pause), and reports the
// headroom: how much of T an evacuation started now would leave unused.
//
// The controller is pure logic; the caller feeds it bandwidth samples
// (backupclient.Stream.Bandwidth) and clock readings.
package flush
