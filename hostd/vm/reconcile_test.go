package vm

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"hostd/hostd/config"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/store"
	"hostd/xen"
	"hostd/xen/xentest"
)

// Reconciliation logic over an in-memory hypervisor: which domains are
// adopted, which records are marked vanished.
func TestReconcileAdoptsOnlyItsOwnDomains(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	cfg.StateDir = filepath.Join(dir, "state")
	st, err := store.Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ev := events.NewBroker()
	jm, _ := jobs.NewManager(st, ev, log)
	hv := xentest.New()
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); jm.Wait(context.Background()) }()
	m := NewManager(ctx, cfg, hv, st, ev, jm, log)

	ours := xen.DomainSpec{Name: "ours", VCPUs: 1, MemoryMiB: 64, RAMPath: filepath.Join(vmDir(t, cfg, "ours"), "ram")}
	theirs := xen.DomainSpec{Name: "theirs", VCPUs: 1, MemoryMiB: 64, RAMPath: "/var/lib/other-hostd/vms/theirs/ram"}
	for _, s := range []xen.DomainSpec{ours, theirs} {
		if err := hv.Define(ctx, s); err != nil {
			t.Fatal(err)
		}
		if err := hv.Start(ctx, s.Name); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := m.Reconcile(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Adopted) != 1 || rep.Adopted[0] != "ours" {
		t.Fatalf("adopted %v, want only [ours] (theirs belongs to another hostd's state dir)", rep.Adopted)
	}
	if v, err := m.Get(ctx, "ours"); err != nil || !v.Adopted || v.State != xen.StateRunning {
		t.Fatalf("adopted VM: %+v %v", v, err)
	}
	if _, err := m.Get(ctx, "theirs"); err == nil {
		t.Fatal("another hostd's VM was taken")
	}

	// The domain disappears behind hostd's back: marked, not forgotten.
	if err := hv.Destroy(ctx, "ours"); err != nil {
		t.Fatal(err)
	}
	if err := hv.Undefine(ctx, "ours"); err != nil {
		t.Fatal(err)
	}
	if rep, err = m.Reconcile(ctx, false); err != nil || len(rep.Vanished) != 1 {
		t.Fatalf("after undefine: %+v %v", rep, err)
	}
	if v, err := m.Get(ctx, "ours"); err != nil || !v.Vanished {
		t.Fatalf("vanished VM: %+v %v", v, err)
	}
}
