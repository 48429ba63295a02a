package vm

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"hostd/hostd/config"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/store"
	"hostd/hostd/valid"
	"hostd/xen"
	"hostd/xen/xentest"
)

// Warm slots over an in-memory hypervisor: a slot is not adopted as a VM,
// is found as a leftover until claimed, decides which saved VMs fit it,
// and once claimed its VM is known by its own name and runs in the slot's
// domain; the resume drops the incoming flag; deleting the VM removes the
// slot's domain.
func TestSlotLifecycle(t *testing.T) {
	m, cfg, hv, ctx := newTestManager(t)
	const slot = SlotPrefix + "256m.1c.test"
	spec, err := m.SlotSpec(slot, 256, 1, filepath.Join(vmDir(t, cfg, slot), "mem", "ram"))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.StartSlot(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if web, err := m.SlotSpec("web", 256, 1, "/x"); err != nil || m.StartSlot(ctx, web) == nil {
		t.Fatalf("a slot not named as one was started (%v)", err)
	}
	if _, err := m.SlotSpec("slot.../../x", 256, 1, "/x"); err == nil {
		t.Fatal("a slot name that leaves the state directory made a spec")
	}
	// A slot whose start a killed hostd did not finish: only its directory.
	if err := os.MkdirAll(vmDir(t, cfg, SlotPrefix+"256m.1c.half"), 0o750); err != nil {
		t.Fatal(err)
	}
	if rep, err := m.Reconcile(ctx, true); err != nil || len(rep.Adopted) != 0 {
		t.Fatalf("reconcile took a slot as a VM: %+v %v", rep, err)
	}
	left, err := m.LeftoverSlots(ctx)
	slices.Sort(left)
	if err != nil || !slices.Equal(left, []string{SlotPrefix + "256m.1c.half", slot}) {
		t.Fatalf("leftover slots %v %v", left, err)
	}

	saved := xen.DomainSpec{Name: "src", VCPUs: 1, MemoryMiB: 256, Kernel: "/elsewhere/vmlinuz", Cmdline: cfg.Guest.Cmdline}
	if why := m.SlotFits(saved, spec); why != "" {
		t.Fatalf("a saved VM of the slot's shape on another host's kernel path does not fit: %s", why)
	}
	for what, s := range map[string]xen.DomainSpec{
		"vcpus":   {VCPUs: 2, MemoryMiB: 256, Cmdline: cfg.Guest.Cmdline},
		"memory":  {VCPUs: 1, MemoryMiB: 128, Cmdline: cfg.Guest.Cmdline},
		"cmdline": {VCPUs: 1, MemoryMiB: 256, Cmdline: cfg.Guest.Cmdline + " quiet"},
		"nic":     {VCPUs: 1, MemoryMiB: 256, Cmdline: cfg.Guest.Cmdline, NICs: []xen.NIC{{Tap: "t0"}}},
	} {
		if why := m.SlotFits(s, spec); why == "" {
			t.Fatalf("a saved VM with another %s fits the slot", what)
		}
	}

	v, err := m.ClaimSlot(ctx, "web", spec)
	if err != nil || v.Name != "web" || v.Domain() != slot || v.State != xen.StateRunning || !v.Restored {
		t.Fatalf("claimed: %+v %v", v, err)
	}
	if _, err := m.ClaimSlot(ctx, "web", spec); err == nil {
		t.Fatal("a second VM of the same name was claimed into a slot")
	}
	if left, _ := m.LeftoverSlots(ctx); slices.Contains(left, slot) {
		t.Fatalf("a claimed slot is listed as a leftover: %v", left)
	}
	if rep, err := m.Reconcile(ctx, false); err != nil || len(rep.Vanished) != 0 {
		t.Fatalf("reconcile lost the VM in the slot: %+v %v", rep, err)
	}
	if name, ok := m.byDomain(slot); !ok || name != "web" {
		t.Fatalf("domain %s maps to %q %v", slot, name, ok)
	}

	m.Resumed(ctx, "web")
	d, err := hv.Domain(ctx, slot)
	if err != nil || d.Spec == nil || d.Spec.Incoming {
		t.Fatalf("after the resume the definition still waits for an incoming state: %+v %v", d.Spec, err)
	}
	if v, _ := m.Get(ctx, "web"); v.Spec.Incoming || v.Ready == nil {
		t.Fatalf("record after the resume: %+v", v.Record)
	}
	if err := m.Delete(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := hv.Domain(ctx, slot); err == nil {
		t.Fatal("deleting the VM left the slot's domain")
	}
}

// vmDir is a domain's directory, for names the test knows to be valid.
func vmDir(t *testing.T, cfg config.Config, domain string) string {
	t.Helper()
	dir, err := cfg.VMDir(domain)
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// newTestManager is a manager over an in-memory hypervisor, with a guest
// image that exists.
func newTestManager(t *testing.T) (*Manager, config.Config, *xentest.Fake, context.Context) {
	t.Helper()
	dir := t.TempDir()
	cfg := config.Default()
	cfg.StateDir, cfg.RunDir = filepath.Join(dir, "state"), filepath.Join(dir, "run")
	cfg.Guest.Kernel, cfg.Guest.Initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd")
	for _, f := range []string{cfg.Guest.Kernel, cfg.Guest.Initrd} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	st, err := store.Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ev := events.NewBroker()
	jm, _ := jobs.NewManager(st, ev, log)
	hv := xentest.New()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); jm.Wait(context.Background()) })
	m := NewManager(ctx, cfg, hv, st, ev, jm, log)

	return m, cfg, hv, ctx
}

// A name being restored is the restore's: a create or a second restore of
// it is refused until the restore releases it.
func TestReservedNamesCannotBeCreated(t *testing.T) {
	m, _, _, ctx := newTestManager(t)
	release, err := m.Reserve(ctx, "db")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, Request{Name: "db", Start: new(bool)}); !errors.Is(err, ErrExists) {
		t.Fatalf("create of a reserved name: %v, want ErrExists", err)
	}
	if _, err := m.Reserve(ctx, "db"); !errors.Is(err, ErrExists) {
		t.Fatalf("second reservation: %v, want ErrExists", err)
	}
	if _, err := m.Reserve(ctx, "../db"); !errors.Is(err, valid.ErrName) {
		t.Fatalf("reservation of a bad name: %v", err)
	}
	release()
	if _, err := m.Create(ctx, Request{Name: "db", Start: new(bool)}); err != nil {
		t.Fatalf("create after the release: %v", err)
	}
	if _, err := m.Reserve(ctx, "db"); !errors.Is(err, ErrExists) {
		t.Fatalf("reservation of an existing VM's name: %v, want ErrExists", err)
	}
}
