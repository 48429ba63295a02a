package memserver_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/backup/backuptest"
	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/bdi"
	"hostd/checkpoint/memfs/memfstest"
	"hostd/checkpoint/memserver"
	"hostd/checkpoint/pki"
)

// envSpawner makes the test binary a parent that spawns a memory server
// and then waits to be killed (TestSpawnedSurvivesParentKill).
const envSpawner = "MEMSERVER_TEST_SPAWNER"

func TestMain(m *testing.M) {
	memfstest.Main()
	// The test binary is its own memserve executable, as hostd is.
	if len(os.Args) > 1 && os.Args[1] == "memserve" {
		os.Exit(memserver.Main(os.Args[2:]))
	}
	if spec := os.Getenv(envSpawner); spec != "" {
		spawnerChild(spec)
		return
	}
	bdi.MountDebugfs() // Status.Unflushed observes the bdi when it can
	os.Exit(m.Run())
}

func needRoot(t testing.TB) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// backupEnv is a PKI, a store directory and an in-process backup server on
// loopback that can be stopped and started again on the same address.
type backupEnv struct{ *backuptest.Server }

func newBackup(tb testing.TB) *backupEnv { return &backupEnv{backuptest.New(tb)} }

func (e *backupEnv) protection(bound time.Duration) memserver.Protection {
	return memserver.Protection{
		Backup: e.Addr,
		TLS: memserver.TLSFiles{
			CA:   filepath.Join(e.PKI, pki.CACert),
			Cert: filepath.Join(e.PKI, pki.ClientCert("host1")),
			Key:  filepath.Join(e.PKI, pki.ClientKey("host1")),
		},
		Bound: bound,
	}
}

// checkImage compares the store's committed image with ram page by page,
// and its device state with state. The server must be down.
func (e *backupEnv) checkImage(t *testing.T, id string, ram []byte, state string) {
	t.Helper()
	st, err := backupstore.Open(e.Store, backupstore.Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	v, err := st.VM(id, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if err := v.ReadAll(context.Background(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Len() != len(ram) {
		t.Fatalf("backup image has %d bytes, RAM file %d", got.Len(), len(ram))
	}
	bad, first := 0, -1
	for p := 0; p < len(ram)/4096; p++ {
		if !bytes.Equal(got.Bytes()[p*4096:(p+1)*4096], ram[p*4096:(p+1)*4096]) {
			if first < 0 {
				first = p
			}
			bad++
		}
	}
	if bad > 0 {
		t.Fatalf("backup image differs from the RAM file in %d of %d pages (first: page %d)", bad, len(ram)/4096, first)
	}
	b, m, err := v.DeviceState()
	if err != nil || string(b) != state || !m.Restorable {
		t.Fatalf("device state %q (restorable %v), want %q: %v", b, m != nil && m.Restorable, state, err)
	}
}

// vm is a spawned memory server.
type vm struct {
	cfg memserver.Config
	c   *memserver.Client
	pid int
	log string
}

func testConfig(t testing.TB, name string, size int64) memserver.Config {
	d := t.TempDir()
	return memserver.Config{VM: name, Dir: filepath.Join(d, "mnt"), Size: size, Socket: filepath.Join(d, "ms.sock"), LogLevel: "debug"}
}

// spawn starts a memory server for cfg through Spawn, as hostd does, and
// makes sure it is gone (and its mount) when the test ends.
func spawn(t testing.TB, cfg memserver.Config) *vm {
	t.Helper()
	dir := filepath.Dir(cfg.Socket)
	cfgFile := filepath.Join(dir, "memserver.json")
	if err := memserver.WriteConfig(cfgFile, cfg); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, "memserver.log")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, pid, err := memserver.Spawn(ctx, os.Args[0], []string{"memserve", "-config", cfgFile}, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	v := &vm{cfg: cfg, c: c, pid: pid, log: log}
	t.Cleanup(func() { v.cleanup(t) })
	return v
}

func (v *vm) cleanup(t testing.TB) {
	// Generous: a shutdown flushes and unmounts, slow on a loaded machine.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := v.c.Shutdown(ctx); err != nil && !errors.Is(err, memserver.ErrNotRunning) {
		t.Errorf("shutdown: %v", err)
		syscall.Kill(v.pid, syscall.SIGKILL)
	}
	// A killed server leaves its mount dead; never leave one behind.
	unix.Unmount(v.cfg.Dir, unix.MNT_DETACH)
	b, _ := os.ReadFile(v.log)
	if bytes.Contains(b, []byte("DATA RACE")) || bytes.Contains(b, []byte("panic:")) {
		t.Errorf("the memory server's log reports a race or a panic")
	}
	if t.Failed() {
		if len(b) > 6000 {
			b = b[len(b)-6000:]
		}
		t.Logf("memory server log (end):\n%s", b)
	}
}

func (v *vm) ramPath() string { return filepath.Join(v.cfg.Dir, "ram") }

func (v *vm) status(t testing.TB) memserver.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := v.c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waitState polls Status until want (bounded).
func (v *vm) waitState(t testing.TB, want memserver.State, within time.Duration) memserver.Status {
	t.Helper()
	deadline := time.Now().Add(within)
	for i := 0; ; i++ {
		st := v.status(t)
		if st.State == want {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("state %s (%s) after %v, want %s; status %+v", st.State, st.Reason, within, want, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readRAM reads the RAM file with read(2): system calls are safe from any
// process, faults on a mapping are not (and this is not the server anyway).
func (v *vm) readRAM(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(v.ramPath())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mounted(t *testing.T, dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func TestSpawnStatusShutdown(t *testing.T) {
	needRoot(t)
	cfg := testConfig(t, "vm-a", 16<<20)
	v := spawn(t, cfg)
	st := v.status(t)
	if st.VM != "vm-a" || st.PID != v.pid || st.Size != cfg.Size || st.State != memserver.StateUnprotected || st.RAMPath != v.ramPath() {
		t.Fatalf("status %+v", st)
	}
	if fi, err := os.Stat(cfg.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v %v", fi, err)
	}
	ctx := ctxFor(t, 30*time.Second)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: v.ramPath(), Size: cfg.Size, Mode: "scribble", Seed: 1, Count: 1000}); err != nil {
		t.Fatal(err)
	}
	if st := v.status(t); st.BytesWrittenBack == 0 {
		t.Fatalf("nothing written back: %+v", st)
	}
	if err := v.c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if mounted(t, cfg.Dir) {
		t.Fatal("still mounted after shutdown")
	}
	if _, err := os.Stat(cfg.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
	_, err := v.c.Status(ctx)
	if !errors.Is(err, memserver.ErrNotRunning) || !strings.Contains(err.Error(), "memory server of VM vm-a is not running") {
		t.Fatalf("status of a stopped server: %v", err)
	}
	t.Logf("stopped server: %v", err)
}

// TestRestartAfterCrash: a SIGKILLed server leaves a dead mount and a
// socket file; the next one on the same paths clears both.
func TestRestartAfterCrash(t *testing.T) {
	needRoot(t)
	cfg := testConfig(t, "vm-crash", 8<<20)
	v := spawn(t, cfg)
	if err := syscall.Kill(v.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// It must really end (not hang in exit on its own mount), and leave
	// the mount dead: statfs asks the server, so it fails.
	for i := 0; ; i++ {
		var sfs unix.Statfs_t
		err := unix.Statfs(cfg.Dir, &sfs)
		_, perr := os.Stat(fmt.Sprintf("/proc/%d", v.pid)) // gone once reaped
		if errors.Is(err, unix.ENOTCONN) && errors.Is(perr, os.ErrNotExist) {
			break
		}
		if i == 250 {
			t.Fatalf("killed server: statfs of its mount %v, its /proc entry %v", err, perr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	v2 := spawn(t, cfg)
	if st := v2.status(t); st.PID != v2.pid || st.PID == v.pid {
		t.Fatalf("status %+v", st)
	}
	ctx := ctxFor(t, 30*time.Second)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: v2.ramPath(), Size: cfg.Size, Mode: "scribble", Seed: 2, Count: 100}); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreLazyAndProtectAgain: a memory server started from a restore
// point serves exactly the checkpointed memory (lazily, then fully
// resident), hands back the device state, and protected again to the same
// backup sends only what was written since the restore, not a recopy.
func TestRestoreLazyAndProtectAgain(t *testing.T) {
	needRoot(t)
	const size = 32 << 20
	e := newBackup(t)
	src := spawn(t, testConfig(t, "vm-src", size))
	ctx := ctxFor(t, 90*time.Second)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: src.ramPath(), Size: size, Mode: "scribble", Seed: 5, Count: 4000}); err != nil {
		t.Fatal(err)
	}
	prot := e.protection(30 * time.Second)
	prot.ID = "vm-x"
	if err := src.c.Protect(ctx, prot); err != nil {
		t.Fatal(err)
	}
	src.waitState(t, memserver.StateProtected, 20*time.Second)
	if _, err := src.c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	cr, err := src.c.Commit(ctx, []byte("state of vm-x"))
	if err != nil {
		t.Fatal(err)
	}
	want := src.readRAM(t)
	src.cleanup(t)

	cfg := testConfig(t, "vm-dst", size)
	cfg.Restore = &memserver.Restore{Backup: e.Addr, ID: "vm-x", TLS: prot.TLS, Mode: "lazy"}
	dst := spawn(t, cfg)
	state, err := dst.c.RestoreState(ctx)
	if err != nil || string(state) != "state of vm-x" {
		t.Fatalf("restore state %q: %v", state, err)
	}
	if got := dst.readRAM(t); !bytes.Equal(got, want) {
		t.Fatal("the restored RAM file differs from the checkpointed one")
	}
	var st memserver.Status
	for i := 0; i < 200; i++ {
		if st = dst.status(t); st.FullyResident {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !st.FullyResident || st.Restore == nil || st.Restore.Epoch != cr.Epoch {
		t.Fatalf("restore status: %+v", st)
	}
	t.Logf("restored epoch %d: %d bytes brought, %d faults, %d events", st.Restore.Epoch, st.Resident, st.FaultCount, st.RestoreEventSeq)

	// Protect again to the same image: only the pages written since.
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: dst.ramPath(), Size: size, Mode: "scribble", Seed: 6, Count: 50, Span: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := dst.c.Protect(ctx, prot); err != nil {
		t.Fatal(err)
	}
	st = dst.waitState(t, memserver.StateProtected, 20*time.Second)
	if st.CopyTotal > 1<<20 {
		t.Fatalf("protecting a restored VM again to its own backup copied %d bytes: a recopy", st.CopyTotal)
	}
	t.Logf("protected again: first copy %d bytes (written since the restore)", st.CopyTotal)
	if _, err := dst.c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.c.Commit(ctx, []byte("state 2")); err != nil {
		t.Fatal(err)
	}
	ram := dst.readRAM(t)
	dst.cleanup(t)
	e.Down()
	e.checkImage(t, "vm-x", ram, "state 2")
}

// TestSlotClaim: a warm slot (started empty) claimed for a restore point
// serves exactly the checkpointed memory, its prefetch held until
// StartPrefetch; a second claim, a claim of a server that is no slot and
// a claim of a slot whose file was read before are refused.
func TestSlotClaim(t *testing.T) {
	needRoot(t)
	const size = 16 << 20
	e := newBackup(t)
	src := spawn(t, testConfig(t, "vm-ssrc", size))
	ctx := ctxFor(t, 90*time.Second)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: src.ramPath(), Size: size, Mode: "scribble", Seed: 7, Count: 2000}); err != nil {
		t.Fatal(err)
	}
	prot := e.protection(30 * time.Second)
	prot.ID = "vm-s"
	if err := src.c.Protect(ctx, prot); err != nil {
		t.Fatal(err)
	}
	src.waitState(t, memserver.StateProtected, 20*time.Second)
	if _, err := src.c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	cr, err := src.c.Commit(ctx, []byte("state of vm-s"))
	if err != nil {
		t.Fatal(err)
	}
	want := src.readRAM(t)
	rc := memserver.Restore{Backup: e.Addr, ID: "vm-s", TLS: prot.TLS, Mode: "lazy", DeferPrefetch: true}
	if err := src.c.Claim(ctx, rc); !isConflict(err) {
		t.Fatalf("claim of a memory server that is no slot: %v", err)
	}
	src.cleanup(t)

	cfg := testConfig(t, "slot-a", size)
	cfg.Slot = true
	slot := spawn(t, cfg)
	if st := slot.status(t); !st.Slot || st.Restore != nil {
		t.Fatalf("unclaimed slot status %+v", st)
	}
	if err := slot.c.Claim(ctx, rc); err != nil {
		t.Fatal(err)
	}
	if st := slot.status(t); st.Slot || st.Restore == nil || st.Restore.Epoch != cr.Epoch {
		t.Fatalf("claimed slot status %+v", st)
	}
	if err := slot.c.Claim(ctx, rc); !isConflict(err) {
		t.Fatalf("second claim: %v", err)
	}
	state, err := slot.c.RestoreState(ctx)
	if err != nil || string(state) != "state of vm-s" {
		t.Fatalf("restore state %q: %v", state, err)
	}
	if err := slot.c.StartPrefetch(ctx); err != nil {
		t.Fatal(err)
	}
	var st memserver.Status
	for i := 0; i < 400; i++ {
		if st = slot.status(t); st.FullyResident {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !st.FullyResident {
		t.Fatalf("the started prefetch never made the slot resident: %+v", st)
	}
	if got := slot.readRAM(t); !bytes.Equal(got, want) {
		t.Fatal("the claimed slot's RAM file differs from the checkpointed one")
	}
	slot.cleanup(t)

	cfg = testConfig(t, "slot-b", size)
	cfg.Slot = true
	touched := spawn(t, cfg)
	touched.readRAM(t)
	err = touched.c.Claim(ctx, rc)
	if !isConflict(err) || !strings.Contains(err.Error(), "touched") {
		t.Fatalf("claim of a slot read before: %v", err)
	}
	touched.cleanup(t)
}

func isConflict(err error) bool {
	var me *memserver.Error
	return errors.As(err, &me) && me.StatusCode == 409
}

// TestProtectCopySyncCommit: pages written before protection (discarded
// then) must reach the backup by the first copy; pages written after by
// the stream; Sync + Commit make a restore point equal to the RAM file.
func TestProtectCopySyncCommit(t *testing.T) {
	needRoot(t)
	const size = 32 << 20
	e := newBackup(t)
	v := spawn(t, testConfig(t, "vm-p", size))
	ctx := ctxFor(t, 60*time.Second)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: v.ramPath(), Size: size, Mode: "scribble", Seed: 1, Count: 3000}); err != nil {
		t.Fatal(err)
	}
	if err := v.c.Protect(ctx, e.protection(30*time.Second)); err != nil {
		t.Fatal(err)
	}
	st := v.waitState(t, memserver.StateProtected, 20*time.Second)
	if st.CopyTotal == 0 || st.CopyDone != st.CopyTotal || st.AckedEpoch == 0 || st.Backup != e.Addr || st.ID != "vm-p" {
		t.Fatalf("after the first copy: %+v", st)
	}
	t.Logf("first copy: %d bytes; cap %d, bandwidth %.1f MB/s, headroom %v", st.CopyTotal, st.Cap, st.Bandwidth/1e6, st.Headroom)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: v.ramPath(), Size: size, Mode: "scribble", Seed: 2, Count: 3000, NoSync: true}); err != nil {
		t.Fatal(err)
	}
	sr, err := v.c.Sync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cr, err := v.c.Commit(ctx, []byte("device state of vm-p"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("sync %+v, commit %+v", sr, cr)
	st = v.status(t)
	if st.RestorableEpoch != cr.Epoch || st.AckedEpoch != cr.Epoch || cr.StateBytes != int64(len("device state of vm-p")) {
		t.Fatalf("after commit %+v: %+v", cr, st)
	}
	ram := v.readRAM(t)
	want := make([]byte, size)
	memfstest.Pattern(want, 1, 3000)
	memfstest.Pattern(want, 2, 3000)
	if !bytes.Equal(ram, want) {
		t.Fatal("RAM file does not hold what the writers wrote")
	}
	e.Down()
	e.checkImage(t, "vm-p", ram, "device state of vm-p")
}

// TestSetRate: the share limits the stream; Status shows it; 0 lifts it.
func TestSetRate(t *testing.T) {
	needRoot(t)
	const size = 16 << 20
	e := newBackup(t)
	v := spawn(t, testConfig(t, "vm-rate", size))
	ctx := ctxFor(t, 60*time.Second)
	p := e.protection(30 * time.Second)
	p.Rate = 8e6
	p.CommitInterval = 300 * time.Millisecond
	if err := v.c.Protect(ctx, p); err != nil {
		t.Fatal(err)
	}
	st0 := v.waitState(t, memserver.StateProtected, 20*time.Second)
	if st0.Rate != 8e6 {
		t.Fatalf("rate in status: %v", st0.Rate)
	}
	run := func(pass int) float64 {
		t.Helper()
		res, err := memfstest.Run(ctx, memfstest.Spec{Path: v.ramPath(), Size: size, Mode: "passes", Passes: pass})
		if err != nil {
			t.Fatal(err)
		}
		return float64(res.Bytes) / (res.Dirty + res.Fsync).Seconds()
	}
	limited := run(1)
	if err := v.c.SetRate(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if st := v.status(t); st.Rate != 0 {
		t.Fatalf("rate after SetRate(0): %v", st.Rate)
	}
	unlimited := run(2)
	if err := v.c.SetRate(ctx, 4e6); err != nil {
		t.Fatal(err)
	}
	st := v.status(t)
	if st.Rate != 4e6 {
		t.Fatalf("rate after SetRate(4e6): %v", st.Rate)
	}
	t.Logf("writer through the stream: %.1f MB/s at a share of 8 MB/s, %.1f MB/s unlimited; controller's bandwidth now %.1f MB/s, cap %d", limited/1e6, unlimited/1e6, st.Bandwidth/1e6, st.Cap)
	// The periodic commits seal epochs on their own.
	for i := 0; st.AckedEpoch <= st0.AckedEpoch; i++ {
		if i == 100 {
			t.Fatalf("no periodic commit: acked epoch %d, was %d", st.AckedEpoch, st0.AckedEpoch)
		}
		time.Sleep(50 * time.Millisecond)
		st = v.status(t)
	}
	t.Logf("periodic commits: acked epoch %d after %d", st.AckedEpoch, st0.AckedEpoch)
	if _, err := v.c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := v.c.Commit(ctx, []byte("s")); err != nil {
		t.Fatal(err)
	}
	ram := v.readRAM(t)
	e.Down()
	e.checkImage(t, "vm-rate", ram, "s")
}

// TestBackupRestart: the backup goes away mid-stream; the guest goes on,
// the server reports degraded and reconnects when the backup is back on
// the same store and port, resending what the lost connection owed.
func TestBackupRestart(t *testing.T) {
	needRoot(t)
	const size = 32 << 20
	e := newBackup(t)
	v := spawn(t, testConfig(t, "vm-b", size))
	ctx := ctxFor(t, 60*time.Second)
	// A share well under what the writer dirties keeps the stream busy
	// when the backup goes.
	p := e.protection(30 * time.Second)
	p.Rate = 20e6
	if err := v.c.Protect(ctx, p); err != nil {
		t.Fatal(err)
	}
	v.waitState(t, memserver.StateProtected, 20*time.Second)
	type result struct {
		res memfstest.Result
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := memfstest.Run(ctx, memfstest.Spec{Path: v.ramPath(), Size: size, Mode: "passes", Passes: 4})
		done <- result{r, err}
	}()
	time.Sleep(300 * time.Millisecond)
	addr := e.Addr
	midStream := len(done) == 0
	e.Down()
	r := <-done
	if r.err != nil {
		t.Fatalf("writer with the backup down: %v", r.err)
	}
	t.Logf("writer finished with the backup down: %d bytes in %v (backup stopped while it ran: %v)", r.res.Bytes, r.res.Dirty+r.res.Fsync, midStream)
	st := v.waitState(t, memserver.StateDegraded, 15*time.Second)
	t.Logf("degraded: %s", st.Reason)
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: v.ramPath(), Size: size, Mode: "scribble", Seed: 5, Count: 2000}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	e.Start(t, addr)
	st = v.waitState(t, memserver.StateProtected, 20*time.Second)
	if st.Reconnects < 1 {
		t.Fatalf("protected again without a reconnect: %+v", st)
	}
	t.Logf("protected again %v after the backup came back, %d reconnects", time.Since(t0).Round(time.Millisecond), st.Reconnects)
	if _, err := v.c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := v.c.Commit(ctx, []byte("after restart")); err != nil {
		t.Fatal(err)
	}
	ram := v.readRAM(t)
	e.Down()
	e.checkImage(t, "vm-b", ram, "after restart")
}

// TestIdleBackupLoss: a backup that goes away while the guest writes
// nothing is noticed all the same (the idle connection is probed).
func TestIdleBackupLoss(t *testing.T) {
	needRoot(t)
	e := newBackup(t)
	v := spawn(t, testConfig(t, "vm-idle", 8<<20))
	ctx := ctxFor(t, 60*time.Second)
	if err := v.c.Protect(ctx, e.protection(30*time.Second)); err != nil {
		t.Fatal(err)
	}
	v.waitState(t, memserver.StateProtected, 20*time.Second)
	addr := e.Addr
	e.Down()
	st := v.waitState(t, memserver.StateDegraded, 15*time.Second)
	t.Logf("idle guest, backup gone: %s", st.Reason)
	e.Start(t, addr)
	v.waitState(t, memserver.StateProtected, 20*time.Second)
}

// TestBadInputs: each is refused with a clear 4xx (or 502 for an
// unreachable backup) and the server goes on.
func TestBadInputs(t *testing.T) {
	needRoot(t)
	e := newBackup(t)
	v := spawn(t, testConfig(t, "vm-bad", 8<<20))
	ctx := ctxFor(t, 60*time.Second)
	expect := func(what string, err error, code int, text string) {
		t.Helper()
		var se *memserver.Error
		if !errors.As(err, &se) || se.StatusCode != code || !strings.Contains(err.Error(), text) {
			t.Fatalf("%s: got %v, want %d with %q", what, err, code, text)
		}
		t.Logf("%s: %d %v", what, se.StatusCode, err)
		if st := v.status(t); st.PID != v.pid {
			t.Fatalf("status after %s: %+v", what, st)
		}
	}
	_, err := v.c.Commit(ctx, []byte("x"))
	expect("commit unprotected", err, http.StatusConflict, "not protected")
	_, err = v.c.Sync(ctx)
	expect("sync unprotected", err, http.StatusConflict, "not protected")
	expect("unprotect unprotected", v.c.Unprotect(ctx), http.StatusConflict, "not protected")
	expect("notice unprotected", v.c.Notice(ctx, time.Now().Add(time.Minute)), http.StatusConflict, "not protected")

	p := e.protection(0)
	expect("zero bound", v.c.Protect(ctx, p), http.StatusBadRequest, "bound 0s")
	p = e.protection(50 * time.Millisecond)
	expect("impossible bound", v.c.Protect(ctx, p), http.StatusBadRequest, "time bound cannot be met")
	p = e.protection(time.Minute)
	p.TLS.Cert = "/nonexistent/client.crt"
	expect("bad TLS files", v.c.Protect(ctx, p), http.StatusBadRequest, "/nonexistent/client.crt")
	p = e.protection(time.Minute)
	p.TLS.CA = p.TLS.Key // a key is no CA
	expect("key as CA", v.c.Protect(ctx, p), http.StatusBadRequest, "no certificate")
	p = e.protection(time.Minute)
	p.Backup = "127.0.0.1:1"
	expect("unreachable backup", v.c.Protect(ctx, p), http.StatusBadGateway, "connection refused")
	p = e.protection(time.Minute)
	p.Backup = "no-port"
	expect("address without port", v.c.Protect(ctx, p), http.StatusBadRequest, "missing port")
	p = e.protection(time.Minute)
	p.ID = "../escape"
	expect("bad id", v.c.Protect(ctx, p), http.StatusBadRequest, "id at the backup")
	expect("negative rate", v.c.SetRate(ctx, -1), http.StatusBadRequest, "not a rate")

	if err := v.c.Protect(ctx, e.protection(time.Minute)); err != nil {
		t.Fatal(err)
	}
	expect("protect twice", v.c.Protect(ctx, e.protection(time.Minute)), http.StatusConflict, "already protected")
	_, err = v.c.Commit(ctx, nil)
	expect("commit without state", err, http.StatusBadRequest, "no device state")
	expect("notice in the past", v.c.Notice(ctx, time.Now().Add(-time.Second)), http.StatusBadRequest, "not in the future")
	if err := v.c.Notice(ctx, time.Now().Add(20*time.Second)); err != nil {
		t.Fatal(err)
	}
	st := v.waitState(t, memserver.StateProtected, 20*time.Second)
	if !st.Notice || st.Bound > 20*time.Second {
		t.Fatalf("after a notice: %+v", st)
	}
	if err := v.c.Unprotect(ctx); err != nil {
		t.Fatal(err)
	}
	if st := v.status(t); st.State != memserver.StateUnprotected {
		t.Fatalf("after unprotect: %+v", st)
	}
	// Protect again on the same backup id: the backup holds an older
	// image now, so the copy covers every page.
	if err := v.c.Protect(ctx, e.protection(time.Minute)); err != nil {
		t.Fatal(err)
	}
	st = v.waitState(t, memserver.StateProtected, 20*time.Second)
	if st.CopyTotal != 8<<20 {
		t.Fatalf("second protection copied %d of %d bytes", st.CopyTotal, 8<<20)
	}
	if _, err := v.c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := v.c.Commit(ctx, []byte("again")); err != nil {
		t.Fatal(err)
	}
	ram := v.readRAM(t)
	e.Down()
	e.checkImage(t, "vm-bad", ram, "again")
}

// TestSpawnedSurvivesParentKill: the server Spawn starts is outside its
// parent's process group and session; SIGKILL of the parent's whole group
// leaves it serving, and Attach finds it.
func TestSpawnedSurvivesParentKill(t *testing.T) {
	needRoot(t)
	// Adopt the orphan so the test can reap it at the end.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, "vm-orphan", 8<<20)
	spec, _ := json.Marshal(cfg)
	ctx := ctxFor(t, 30*time.Second)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envSpawner+"="+string(spec))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "pid ") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("spawner said %q: %v", line, err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "pid ")))
	t.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGKILL)
		unix.Unmount(cfg.Dir, unix.MNT_DETACH)
		var ws unix.WaitStatus
		unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	})
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	c, err := memserver.Attach(ctx, cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil || st.PID != pid {
		t.Fatalf("status %+v: %v (spawned pid %d)", st, err, pid)
	}
	if _, err := memfstest.Run(ctx, memfstest.Spec{Path: st.RAMPath, Size: cfg.Size, Mode: "scribble", Seed: 3, Count: 100}); err != nil {
		t.Fatal(err)
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ { // reap it: it is ours now
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if got == pid {
			if !ws.Exited() || ws.ExitStatus() != 0 {
				t.Fatalf("server ended with %v", ws)
			}
			break
		}
		if i == 200 || err != nil {
			t.Fatalf("server %d not reaped: %v", pid, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
	if mounted(t, cfg.Dir) {
		t.Fatal("still mounted")
	}
}

// spawnerChild is the parent that dies: it spawns a server, says its pid
// and waits to be killed.
func spawnerChild(spec string) {
	var cfg memserver.Config
	if err := json.Unmarshal([]byte(spec), &cfg); err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	dir := filepath.Dir(cfg.Socket)
	cfgFile := filepath.Join(dir, "memserver.json")
	if err := memserver.WriteConfig(cfgFile, cfg); err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, pid, err := memserver.Spawn(ctx, os.Args[0], []string{"memserve", "-config", cfgFile}, cfg, filepath.Join(dir, "memserver.log"))
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	fmt.Printf("pid %d\n", pid)
	time.Sleep(time.Minute) // bounded: the test kills us long before
	os.Exit(0)
}
