package libvirt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
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

// TestErrors checks the sentinels callers branch on, against the real
// libvirtd, and that a refused define leaves nothing behind.
func TestErrors(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	missing := "t-xen-missing-" + uniqueName(t)[len("t-xen-"):]
	for op, call := range map[string]func() error{
		"Start":     func() error { return d.Start(ctx, missing) },
		"Shutdown":  func() error { return d.Shutdown(ctx, missing, time.Second) },
		"Destroy":   func() error { return d.Destroy(ctx, missing) },
		"Undefine":  func() error { return d.Undefine(ctx, missing) },
		"Suspend":   func() error { return d.Suspend(ctx, missing) },
		"Resume":    func() error { return d.Resume(ctx, missing) },
		"SetMemory": func() error { return d.SetMemory(ctx, missing, 64) },
		"Domain":    func() error { _, err := d.Domain(ctx, missing); return err },
		"Stats":     func() error { _, err := d.Stats(ctx, missing); return err },
		"Command":   func() error { _, err := d.Command(ctx, missing, "query-status", nil); return err },
	} {
		err := call()
		if !errors.Is(err, xen.ErrNotFound) || !strings.Contains(err.Error(), missing) {
			t.Errorf("%s of an unknown domain: want ErrNotFound naming it, got %v", op, err)
		}
	}

	// A nonexistent kernel is refused before libvirt sees anything.
	name := uniqueName(t)
	dir := shortTempDir(t)
	spec := guestSpec(t, g, name, dir)
	cleanupDomain(t, d, name)
	bad := spec
	bad.Kernel = filepath.Join(dir, "no-such-vmlinuz")
	err := d.Define(ctx, bad)
	if !errors.Is(err, xen.ErrInvalidSpec) || !strings.Contains(err.Error(), "no-such-vmlinuz") {
		t.Fatalf("Define with a missing kernel: want ErrInvalidSpec naming it, got %v", err)
	}
	if _, err := d.Domain(ctx, name); !errors.Is(err, xen.ErrNotFound) {
		t.Fatalf("refused define left a domain behind: %v", err)
	}

	// Duplicate names and UUIDs.
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	if err := d.Define(ctx, spec); !errors.Is(err, xen.ErrExists) {
		t.Fatalf("second Define of %s: want ErrExists, got %v", name, err)
	}
	info, err := d.Domain(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	other := spec
	other.Name = uniqueName(t)
	other.UUID = info.UUID
	cleanupDomain(t, d, other.Name)
	if err := d.Define(ctx, other); !errors.Is(err, xen.ErrExists) || !strings.Contains(err.Error(), name) {
		t.Fatalf("Define reusing %s's uuid: want ErrExists naming it, got %v", name, err)
	}

	// State errors on a defined, stopped domain.
	for op, call := range map[string]func() error{
		"Suspend":   func() error { return d.Suspend(ctx, name) },
		"Resume":    func() error { return d.Resume(ctx, name) },
		"Shutdown":  func() error { return d.Shutdown(ctx, name, time.Second) },
		"SetMemory": func() error { return d.SetMemory(ctx, name, 64) },
		"Stats":     func() error { _, err := d.Stats(ctx, name); return err },
	} {
		if err := call(); !errors.Is(err, xen.ErrState) {
			t.Errorf("%s of a stopped domain: want ErrState, got %v", op, err)
		}
	}
	if _, err := d.Command(ctx, name, "query-status", nil); !errors.Is(err, xen.ErrState) {
		t.Errorf("monitor command on a stopped domain: want ErrState, got %v", err)
	}

	// A done context stops a call before it reaches libvirt.
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	if _, err := d.Domain(cctx, name); !errors.Is(err, context.Canceled) {
		t.Errorf("Domain with a cancelled context: got %v", err)
	}

	// List shows it with its state, size and persistence (the spec is for
	// Domain to read); the list holds whatever else the shared libvirtd has.
	list, err := d.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	found := false
	for _, di := range list {
		if di.Name == name {
			found = true
			if di.Spec != nil || di.State != xen.StateShutoff || di.VCPUs != 1 || di.MemoryMiB == 0 || !di.Persistent || di.UUID == "" {
				t.Errorf("List entry %+v", di)
			}
		}
	}
	if !found {
		t.Errorf("List lacks %s", name)
	}
}
