package libvirt

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/xen"
	"hostd/xen/qemu"
)

// TestSaveRestore is the checkpoint path end to end: a guest with RAM in a
// shared file is paused, its device state alone saved through the monitor
// (x-ignore-shared), its QEMU destroyed; a new domain on the same RAM file
// starts with Incoming, loads the state and resumes, and the same guest
// carries on: the agent answers with an uptime that went on from before, and
// the kernel did not boot again.
func TestSaveRestore(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	mon := qemu.New(d.Monitor())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	dir := shortTempDir(t)
	src := guestSpec(t, g, uniqueName(t), dir)
	cleanupDomain(t, d, src.Name)
	if err := d.Define(ctx, src); err != nil {
		t.Fatalf("Define: %v", err)
	}
	if err := d.Start(ctx, src.Name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitSerial(t, src.SerialLog, "HOSTD-AGENT READY", 1, bootTimeout)
	before := agentPing(t, src.AgentSocket)

	// Monitor errors come back typed.
	_, err := d.Command(ctx, src.Name, "no-such-command", nil)
	var me *xen.MonitorError
	if !errors.As(err, &me) || me.Class != "CommandNotFound" {
		t.Fatalf("unknown QMP command: want MonitorError CommandNotFound, got %v", err)
	}
	if _, err := d.Command(ctx, "t-xen-no-such-domain", "query-status", nil); !errors.Is(err, xen.ErrNotFound) {
		t.Fatalf("monitor on unknown domain: want ErrNotFound, got %v", err)
	}

	// Save.
	statePath := filepath.Join(dir, "device.state")
	f, err := os.Create(statePath)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := d.Suspend(ctx, src.Name); err != nil {
		t.Fatalf("Suspend: %v", err)
	}
	if err := mon.SetMigrationCapabilities(ctx, src.Name, map[string]bool{"x-ignore-shared": true}); err != nil {
		t.Fatalf("SetMigrationCapabilities: %v", err)
	}
	mi, err := mon.SaveDeviceState(ctx, src.Name, f)
	if err != nil {
		t.Fatalf("SaveDeviceState: %v", err)
	}
	saveTook := time.Since(t0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	size := fileSize(t, statePath)
	t.Logf("measured: suspend+save took %s, state %d bytes, qemu total-time %d ms, ram transferred %+v",
		saveTook.Round(time.Millisecond), size, mi.TotalTimeMS, mi.RAM)
	if mi.Status != "completed" || size == 0 || size > 16<<20 {
		t.Fatalf("save: status %s, state %d bytes (want the device state only: RAM is shared)", mi.Status, size)
	}
	// The restore target is defined on the same RAM file while the source
	// still runs, but may not start before the source has stopped.
	dst := src
	dst.Name = uniqueName(t)
	dst.Incoming = true
	cleanupDomain(t, d, dst.Name)
	if err := d.Define(ctx, dst); err != nil {
		t.Fatalf("Define incoming: %v", err)
	}
	if err := d.Start(ctx, dst.Name); !errors.Is(err, xen.ErrState) || !strings.Contains(err.Error(), src.Name) {
		t.Fatalf("Start on a RAM file the running source maps: want ErrState naming %s, got %v", src.Name, err)
	}

	t0 = time.Now()
	if err := d.Destroy(ctx, src.Name); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	t.Logf("measured: destroy took %s", time.Since(t0).Round(time.Millisecond))
	if err := d.Undefine(ctx, src.Name); err != nil {
		t.Fatalf("Undefine: %v", err)
	}
	serialBefore, _ := os.ReadFile(src.SerialLog)

	// Restore into the new domain on the same RAM file.
	t0 = time.Now()
	if err := d.Start(ctx, dst.Name); err != nil {
		t.Fatalf("Start incoming: %v", err)
	}
	startTook := time.Since(t0)
	if info, err := d.Domain(ctx, dst.Name); err != nil || info.State != xen.StatePaused {
		t.Fatalf("incoming domain after start: %+v, %v", info, err)
	}
	r, err := os.Open(statePath)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	t1 := time.Now()
	if err := mon.SetMigrationCapabilities(ctx, dst.Name, map[string]bool{"x-ignore-shared": true}); err != nil {
		t.Fatalf("SetMigrationCapabilities: %v", err)
	}
	if err := mon.LoadDeviceState(ctx, dst.Name, r); err != nil {
		t.Fatalf("LoadDeviceState: %v", err)
	}
	if err := d.Resume(ctx, dst.Name); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	t.Logf("measured: restore start (create, paused) %s, load+resume %s, create-to-running %s",
		startTook.Round(time.Millisecond), time.Since(t1).Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	if info, err := d.Domain(ctx, dst.Name); err != nil || info.State != xen.StateRunning {
		t.Fatalf("restored domain: %+v, %v", info, err)
	}

	after := agentPing(t, dst.AgentSocket)
	if after.UptimeMS < before.UptimeMS {
		t.Fatalf("guest uptime went from %d ms to %d ms: it rebooted instead of continuing", before.UptimeMS, after.UptimeMS)
	}
	// A second load into a running domain is refused, not attempted.
	if err := mon.LoadDeviceState(ctx, dst.Name, r); !errors.Is(err, xen.ErrState) {
		t.Fatalf("LoadDeviceState into a running domain: want ErrState, got %v", err)
	}
	// The serial log keeps growing (the agent prints each answer) and no
	// second boot shows up in it.
	waitFor(t, "serial log to grow", 30*time.Second, func() (bool, error) {
		agentPing(t, dst.AgentSocket)
		b, err := os.ReadFile(dst.SerialLog)
		return len(b) > len(serialBefore), err
	})
	all, _ := os.ReadFile(dst.SerialLog)
	if n := bytes.Count(all, []byte("Linux version")); n != 1 {
		t.Fatalf("serial log shows %d kernel boots, want 1", n)
	}
	t.Logf("uptime before %d ms, after restore %d ms", before.UptimeMS, after.UptimeMS)

	// Checkpoint and carry on: a restored domain saves its state again
	// and resumes, as a periodic checkpoint does.
	f2, err := os.Create(filepath.Join(dir, "device2.state"))
	if err != nil {
		t.Fatal(err)
	}
	defer f2.Close()
	if err := d.Suspend(ctx, dst.Name); err != nil {
		t.Fatalf("Suspend restored: %v", err)
	}
	if _, err := mon.SaveDeviceState(ctx, dst.Name, f2); err != nil {
		t.Fatalf("SaveDeviceState of the restored domain: %v", err)
	}
	if err := d.Resume(ctx, dst.Name); err != nil {
		t.Fatalf("Resume after a save: %v", err)
	}
	if again := agentPing(t, dst.AgentSocket); again.UptimeMS < after.UptimeMS {
		t.Fatalf("uptime went back from %d to %d ms after checkpoint-and-continue", after.UptimeMS, again.UptimeMS)
	}
	if caps, err := mon.MigrationCapabilities(ctx, dst.Name); err != nil || !caps["x-ignore-shared"] {
		t.Fatalf("migration capabilities: %v, %v", caps, err)
	}

	// Redefined without Incoming while it runs: the guest runs on, and
	// the next start boots it instead of waiting for a migration.
	if err := d.ClearIncoming(ctx, dst.Name); err != nil {
		t.Fatalf("ClearIncoming: %v", err)
	}
	if info, err := d.Domain(ctx, dst.Name); err != nil || info.State != xen.StateRunning {
		t.Fatalf("after ClearIncoming: %+v, %v", info, err)
	}
	agentPing(t, dst.AgentSocket)
	if err := d.Destroy(ctx, dst.Name); err != nil {
		t.Fatalf("Destroy restored: %v", err)
	}
	if info, err := d.Domain(ctx, dst.Name); err != nil || info.Spec == nil || info.Spec.Incoming {
		t.Fatalf("stopped restored domain still defined with incoming: %+v, %v", info.Spec, err)
	}
	if err := d.Start(ctx, dst.Name); err != nil {
		t.Fatalf("Start the restored domain again: %v", err)
	}
	waitSerial(t, dst.SerialLog, "HOSTD-AGENT READY", 2, bootTimeout)
}
