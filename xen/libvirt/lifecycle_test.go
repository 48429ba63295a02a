package libvirt

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"hostd/xen"
)

// TestLifecycle walks one guest through define, start (to the agent's ready
// line), stats, balloon, suspend/resume, destroy and undefine, watching the
// lifecycle events on the way.
func TestLifecycle(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	evctx, evcancel := context.WithCancel(ctx)
	defer evcancel()
	events, err := d.Events(evctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}

	name := uniqueName(t)
	dir := shortTempDir(t)
	spec := guestSpec(t, g, name, dir)
	cleanupDomain(t, d, name)

	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	info, err := d.Domain(ctx, name)
	if err != nil {
		t.Fatalf("Domain: %v", err)
	}
	if info.State != xen.StateShutoff || !info.Persistent || info.Spec == nil {
		t.Fatalf("after define: %+v", info)
	}
	if info.Spec.RAMPath != spec.RAMPath || info.Spec.UUID != info.UUID || info.Spec.Kernel != spec.Kernel {
		t.Fatalf("recorded spec %+v does not match %+v (uuid %s)", info.Spec, spec, info.UUID)
	}

	t0 := time.Now()
	if err := d.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	started := time.Since(t0)
	info, err = d.Domain(ctx, name)
	if err != nil || info.State != xen.StateRunning || info.ID == 0 {
		t.Fatalf("after start: %+v, %v", info, err)
	}
	waitSerial(t, spec.SerialLog, "HOSTD-AGENT READY", 1, bootTimeout)
	t.Logf("measured: start returned after %s, agent ready after %s", started.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	if fi, err := os.Stat(spec.RAMPath); err != nil || fi.Size() != int64(spec.MemoryMiB)<<20 {
		t.Fatalf("ram file %s: %v, %v", spec.RAMPath, fi, err)
	}
	agentPing(t, spec.AgentSocket)

	if err := d.Start(ctx, name); !errors.Is(err, xen.ErrState) {
		t.Fatalf("Start of a running domain: want ErrState, got %v", err)
	}
	if err := d.Undefine(ctx, name); !errors.Is(err, xen.ErrState) {
		t.Fatalf("Undefine of a running domain: want ErrState, got %v", err)
	}

	// Balloon statistics arrive once the guest's driver has reported.
	var st xen.DomainStats
	waitFor(t, "guest memory statistics", 30*time.Second, func() (bool, error) {
		st, err = d.Stats(ctx, name)
		return err == nil && st.AvailableMiB > 0, err
	})
	if st.CPUTime <= 0 || st.MemoryMiB != 256 || st.BalloonMiB != 256 || st.RSSMiB == 0 || st.AvailableMiB > 256 {
		t.Fatalf("stats: %+v", st)
	}
	t.Logf("stats: %+v", st)

	if err := d.SetMemory(ctx, name, 192); err != nil {
		t.Fatalf("SetMemory: %v", err)
	}
	waitFor(t, "balloon at 192 MiB", 30*time.Second, func() (bool, error) {
		st, err = d.Stats(ctx, name)
		return err == nil && st.BalloonMiB == 192, err
	})
	if err := d.SetMemory(ctx, name, 512); !errors.Is(err, xen.ErrInvalidSpec) {
		t.Fatalf("SetMemory above the maximum: want ErrInvalidSpec, got %v", err)
	}

	if err := d.Suspend(ctx, name); err != nil {
		t.Fatalf("Suspend: %v", err)
	}
	if info, _ := d.Domain(ctx, name); info.State != xen.StatePaused {
		t.Fatalf("after suspend: %+v", info)
	}
	if err := d.Resume(ctx, name); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	if info, _ := d.Domain(ctx, name); info.State != xen.StateRunning {
		t.Fatalf("after resume: %+v", info)
	}
	agentPing(t, spec.AgentSocket)

	t0 = time.Now()
	if err := d.Destroy(ctx, name); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	t.Logf("measured: destroy took %s", time.Since(t0).Round(time.Millisecond))
	if err := d.Destroy(ctx, name); err != nil {
		t.Fatalf("second Destroy: want nil, got %v", err)
	}
	if _, err := d.Stats(ctx, name); !errors.Is(err, xen.ErrState) {
		t.Fatalf("Stats of a stopped domain: want ErrState, got %v", err)
	}
	if _, err := os.Stat(spec.RAMPath); err != nil {
		t.Fatalf("ram file must outlive the domain: %v", err)
	}
	if err := d.Undefine(ctx, name); err != nil {
		t.Fatalf("Undefine: %v", err)
	}
	if _, err := d.Domain(ctx, name); !errors.Is(err, xen.ErrNotFound) {
		t.Fatalf("Domain after undefine: want ErrNotFound, got %v", err)
	}

	// Every step above is an event, in this order. libvirt adds some of its
	// own in between (resumed when it starts the vCPUs, shutdown when it
	// asks QEMU to quit) and other engineers' domains have theirs: only
	// ours are followed, and want must be a subsequence of them.
	want := []string{xen.EventDefined, xen.EventStarted, xen.EventSuspended, xen.EventResumed, xen.EventStopped, xen.EventUndefined}
	var got []string
	timeout := time.After(30 * time.Second)
	for matched := 0; matched < len(want); {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("events closed early; got %v, want %v in order", got, want)
			}
			if ev.Domain != name {
				continue
			}
			if ev.UUID != info.UUID || ev.Time.IsZero() || ev.Detail == "" {
				t.Fatalf("event %+v: want uuid %s, a time and a detail", ev, info.UUID)
			}
			got = append(got, ev.Event+"/"+ev.Detail)
			if ev.Event == want[matched] {
				matched++
			}
		case <-timeout:
			t.Fatalf("events: got %v, want %v in order", got, want)
		}
	}
	t.Logf("events: %v", got)
	evcancel()
	for i := 0; i < eventBuffer+1; i++ {
		if _, ok := <-events; !ok {
			return
		}
	}
	t.Fatal("events channel not closed after its context ended")
}
