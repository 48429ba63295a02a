package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/hostd/api"
	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/hostdtest"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/hostd/vm"
)

// waitSlots polls GET /v1/host until the warm slot of memory mib and vcpus
// has ready slots and (claims >= 0) that many claims.
func waitSlots(t *testing.T, ctx context.Context, c *client.Client, mib uint64, vcpus, ready int, claims int64) protect.SlotStatus {
	t.Helper()
	var last api.HostInfo
	for i := 0; i < 900; i++ {
		h, err := c.Host(ctx)
		if err != nil {
			t.Fatalf("GET /v1/host: %v", err)
		}
		last = h
		for _, s := range h.WarmSlots {
			if s.MemoryMiB == mib && s.VCPUs == vcpus && s.Ready == ready && (claims < 0 || s.Claims == claims) {
				return s
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("warm slots never had %d ready of %d MiB, %d vCPUs: %+v", ready, mib, vcpus, last.WarmSlots)
	return protect.SlotStatus{}
}

// A host with a warm slot restores a VM of that shape into it: the VM runs
// in the slot's domain, memory intact, workload continuing, and the slot is
// refilled. Shut down and started again, the restored VM boots (its
// definition lost the incoming flag). After a kill -9 the next hostd,
// configured with another slot shape, removes the old slot and restores
// the same VM cold: no slot fits it.
func TestWarmSlotRestore(t *testing.T) {
	bk := hostdtest.StartBackup(t, binDir, hostdtest.BackupOptions{})
	const mib = 256
	d := startHostd(t, hostdtest.Options{Edit: func(c *config.Config) {
		bk.HostTLS(c, "host1")
		c.Restore.WarmSlots = []config.WarmSlot{{MemoryMiB: mib, VCPUs: 1, Count: 1}}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "wsrc"
	epoch, before := evacuatedSource(t, ctx, d, bk, name, 31)
	if err := c.DeleteVM(ctx, name); err != nil {
		t.Fatal(err)
	}

	s0 := waitSlots(t, ctx, c, mib, 1, 1, 0)
	t.Logf("warm slot ready: %+v", s0)
	warm := prefix + "warm"
	r := restoreAndWait(t, ctx, c, protect.RestoreRequest{Backup: bk.Addr, ID: name, Name: warm})
	t.Logf("warm restore: slot %s, resume %.0f ms, resident %.0f ms, phases %+v", r.Slot, r.ResumeMS, r.ResidentMS, r.Phases)
	if r.Slot == "" || !vm.IsSlot(r.Slot) || r.Epoch != epoch {
		t.Fatalf("restore did not use the warm slot (cold: %q), epoch %d (evacuated %d)", r.ColdReason, r.Epoch, epoch)
	}
	for _, p := range r.Phases {
		if p.Name == "define" || p.Name == "memory" {
			t.Fatalf("a warm restore started its own QEMU or memory server: phases %+v", r.Phases)
		}
	}
	v := mustVM(t, d, warm)
	if v.Domain() != r.Slot || !v.Restored {
		t.Fatalf("restored VM %+v does not run in slot %s", v.Record, r.Slot)
	}
	checkRestored(t, ctx, c, warm, before)
	s1 := waitSlots(t, ctx, c, mib, 1, 1, 1)
	t.Logf("slot refilled: %+v", s1)

	// Restarted, the restored VM boots cold (it no longer waits for an
	// incoming state).
	j, err := c.ShutdownVM(ctx, warm, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if j, err = c.WaitJob(ctx, j.ID); err != nil || j.State != jobs.Succeeded {
		t.Fatalf("shutdown of the restored VM: %v %+v", err, j)
	}
	if v = mustVM(t, d, warm); v.State != "shutoff" || v.Spec.Incoming {
		t.Fatalf("after shutdown: state %s, incoming %v", v.State, v.Spec.Incoming)
	}
	if _, err := c.StartVM(ctx, warm); err != nil {
		t.Fatalf("start the restored VM again: %v", err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	v, err = c.WaitReady(wctx, warm)
	wcancel()
	if err != nil || v.State != "running" {
		t.Fatalf("restarted restored VM never booted: %v %+v", err, v)
	}
	t.Logf("restored VM restarted: booted in %.0f ms", v.BootMS)
	if err := c.DeleteVM(ctx, warm); err != nil {
		t.Fatal(err)
	}
	if doms, _ := hostdtest.Domains(r.Slot); len(doms) != 0 {
		t.Fatalf("deleting the VM left its slot domain %v", doms)
	}
	// Its memory server exits: the refill's QEMU, started while the VM
	// ran, has a copy of the VM's RAM mount in its mount namespace, which
	// must not keep the server's unmount waiting.
	memserverGone(t, d, r.Slot)

	// kill -9, then another slot shape: the old slot must go; the VM no
	// slot fits comes back cold.
	waitSlots(t, ctx, c, mib, 1, 1, 1)
	old := slotDomains(t, d, vm.SlotPrefix+"256m.1c.")
	if len(old) == 0 {
		t.Fatal("the ready slot has no domain")
	}
	d.Kill9()
	d.Reconfigure(func(c *config.Config) {
		c.Restore.WarmSlots = []config.WarmSlot{{MemoryMiB: mib, VCPUs: 2, Count: 1}}
	})
	d.Restart()
	waitSlots(t, ctx, c, mib, 2, 1, 0)
	if left := slotDomains(t, d, vm.SlotPrefix+"256m.1c."); len(left) != 0 {
		t.Fatalf("the killed hostd's slots %v are still defined", left)
	}
	cold := prefix + "cold"
	r = restoreAndWait(t, ctx, c, protect.RestoreRequest{Backup: bk.Addr, ID: name, Name: cold})
	t.Logf("cold restore: resume %.0f ms, reason %q", r.ResumeMS, r.ColdReason)
	if r.Slot != "" || !strings.Contains(r.ColdReason, "no warm slots of 256 MiB and 1 vCPUs") {
		t.Fatalf("a VM no slot fits was restored into slot %q (reason %q)", r.Slot, r.ColdReason)
	}
	if v := mustVM(t, d, cold); v.Domain() != cold {
		t.Fatalf("cold-restored VM runs in domain %s", v.Domain())
	}
	checkRestored(t, ctx, c, cold, before)
	if err := c.DeleteVM(ctx, cold); err != nil {
		t.Fatal(err)
	}
	// A graceful stop removes the slots.
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if left := slotDomains(t, d, vm.SlotPrefix); len(left) != 0 {
		t.Fatalf("hostd stopped but left its slots %v", left)
	}
}

// slotDomains lists the slot domains (names starting with prefix) of
// daemon d: other daemons on this libvirtd may have slots of their own.
func slotDomains(t *testing.T, d *hostdtest.Daemon, prefix string) []string {
	t.Helper()
	names, err := hostdtest.Domains(prefix)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range names {
		if xml, err := hostdtest.Virsh("dumpxml", n); err == nil && strings.Contains(xml, d.Config.StateDir+"/") {
			out = append(out, n)
		}
	}
	return out
}

// memserverGone waits (bounded) until no memory server of daemon d serves
// domain dom any more.
func memserverGone(t *testing.T, d *hostdtest.Daemon, dom string) {
	t.Helper()
	marker := filepath.Join(d.Config.StateDir, "vms", dom, "memserver.json")
	for i := 0; i < 300; i++ {
		alive := false
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), marker) {
				alive = true
				break
			}
		}
		if !alive {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("the memory server of %s still runs after its VM was deleted", dom)
}
