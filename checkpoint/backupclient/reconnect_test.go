package backupclient_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"hostd/checkpoint/backup/backuptest"
	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/memfs"
	"hostd/checkpoint/memfs/memfstest"
	"hostd/checkpoint/pki"
)

// TestMain lets the test binary be the memfstest writer: the guest must be
// another process than the one serving the FUSE file.
func TestMain(m *testing.M) {
	memfstest.Main()
	os.Exit(m.Run())
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// ramFile is the stream's Source as the memory server gives it: the RAM
// file read by path, opened for each read. The close matters: closing a
// FUSE file sends FLUSH, before which the kernel writes back the file's
// dirty pages and waits for their WRITEs, and memfs answers a WRITE only
// when its queue has room.
type ramFile struct{ path string }

func (r ramFile) ReadAt(p []byte, off int64) (int, error) {
	f, err := os.Open(r.path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.ReadAt(p, off)
}

// abortFUSE ends the mount's FUSE connection, so that anything stuck in
// it (a deadlocked Reconnect, the writer) fails instead of hanging the
// test binary. It mounts the FUSE control filesystem for the purpose if
// the system has not, and unmounts it again.
func abortFUSE(t *testing.T, fs *memfs.FS) {
	const ctl = "/sys/fs/fuse/connections"
	_, minor, _ := strings.Cut(fs.BDI().Name, ":") // FUSE devices have major 0
	path := filepath.Join(ctl, minor, "abort")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if err := syscall.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil {
			t.Logf("mount fusectl: %v", err)
		} else {
			defer syscall.Unmount(ctl, 0)
		}
	}
	if err := os.WriteFile(path, []byte("1"), 0); err != nil {
		t.Logf("abort FUSE connection %s: %v", path, err)
	}
}

// TestReconnectWhileGuestWrites breaks the stream several times while a
// guest process dirties its memory without pause, and reconnects each
// time. The memfs queue is small, so it is full most of the time and
// writeback WRITEs wait for room in it, while Reconnect reads the owed
// pages from the RAM file (see ramFile: a read waits for the writeback). A
// Reconnect that held the stream's lock across those reads deadlocked:
// the read waits for WRITEs, the WRITEs for queue room, the queue for a
// delivery, the delivery (SendPages) for the lock. The breaks alternate
// between a backup that restarts with its store and one that comes back
// empty (a full resync, zero pages skipped). Once the guest stops, Sync
// and Commit must leave the backup's image equal to the file, page by page:
// a resend that let a stale read overwrite a newer delivery fails here.
func TestReconnectWhileGuestWrites(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	const (
		size     = 32 << 20
		breaks   = 6
		maxRuns  = 2000        // writer processes, at most
		perRun   = 20000       // 64-byte stores per writer process
		hangWait = time.Minute // a Reconnect takes well under a second here
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := backuptest.New(t)
	tc, err := pki.DirClientConfig(e.PKI, "host1", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ram := ramFile{path: filepath.Join(dir, "ram")}
	s, err := backupclient.Open(ctx, backupclient.Config{
		Addr: e.Addr, TLS: tc, VMID: "vm1", ImageSize: size, Source: ram, Logger: quiet(), DialTimeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	fs, err := memfs.Mount(ctx, dir, memfs.Options{
		Size: size, Sink: s, QueueBytes: 1 << 20, DirtyCap: 4 << 20, Logger: quiet(),
	})
	if err != nil {
		t.Fatal(err)
	}
	var unmountOnce sync.Once
	unmount := func() {
		unmountOnce.Do(func() {
			if err := fs.Unmount(); err != nil {
				t.Errorf("unmount: %v", err)
			}
		})
	}
	t.Cleanup(unmount)

	// The guest: writer processes one after another, each a bounded
	// scribble of its own seed, until told to stop.
	var stop atomic.Bool
	runs := 0
	writerErr := make(chan error, 1)
	go func() {
		for seed := 1; seed <= maxRuns && !stop.Load(); seed++ {
			if _, err := memfstest.Run(ctx, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "scribble", Seed: uint64(seed), Count: perRun, NoSync: true}); err != nil {
				writerErr <- err
				return
			}
			runs = seed
		}
		writerErr <- nil
	}()
	stopWriter := func() error {
		stop.Store(true)
		select {
		case err := <-writerErr:
			return err
		case <-time.After(hangWait):
			return errors.New("writer did not finish its run")
		}
	}
	// reconnect runs Reconnect, and if it does not come back, aborts the
	// FUSE connection so that the test fails instead of hanging.
	reconnect := func(what string) {
		t.Helper()
		t0 := time.Now()
		done := make(chan error, 1)
		go func() { done <- s.Reconnect(ctx) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: reconnect: %v", what, err)
			}
			st := s.Stats()
			t.Logf("%s: reconnect took %v (acked %d, epoch %d, %d pages owed)", what, time.Since(t0), st.Acked, st.Epoch, st.PendingPages)
		case <-time.After(hangWait):
			abortFUSE(t, fs)
			stopWriter()
			t.Fatalf("%s: Reconnect has not returned after %v: deadlocked against the writeback it waits for", what, hangWait)
		}
	}
	settle := func() { // let the guest dirty pages and writeback deliver them
		for i := 0; i < 20 && fs.Stats().Writes < 50; i++ {
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond)
	}

	settle()
	for i := 0; i < breaks; i++ {
		// A commit now and then, so there are both acknowledged epochs
		// and owed pages; it may fail if a delivery broke the stream.
		if _, err := s.Commit(ctx, false); err != nil {
			t.Logf("break %d: commit before: %v", i, err)
		}
		settle()
		e.Down()
		what := fmt.Sprintf("break %d (backup restarted)", i)
		if i%2 == 1 {
			// The backup comes back without anything: it lost epochs it
			// had acknowledged, and every page goes again.
			e.Store = t.TempDir()
			what = fmt.Sprintf("break %d (backup lost its store)", i)
		}
		settle() // deliveries fail and are owed while the backup is away
		e.Start(t, e.Addr)
		reconnect(what)
		if i < breaks-1 {
			settle()
		}
	}
	// The guest stops soon after the last resend: a page the resend got
	// wrong has little chance to be rewritten before the comparison.
	if err := stopWriter(); err != nil {
		t.Fatal(err)
	}
	t.Logf("writer: %d runs of %d stores; memfs %+v", runs, perRun, fs.Stats())

	// Content: the sink errors of the breaks are reported by the next
	// barrier; clear them, then the final flush must succeed on the
	// repaired stream.
	if err := fs.Barrier(ctx); err != nil {
		t.Logf("barrier after the breaks: %v", err)
	}
	if st := s.Stats(); st.Broken {
		reconnect("final")
	}
	if err := fs.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	ep, err := s.Commit(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for seed := 1; seed <= runs; seed++ {
		memfstest.Pattern(want, uint64(seed), perRun)
	}
	got := make([]byte, size)
	if _, err := ram.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(got, want); d >= 0 {
		t.Fatalf("the RAM file differs from what the writer wrote at page %d", d)
	}
	unmount()
	s.Close()
	e.Down()
	st, err := backupstore.Open(e.Store, backupstore.Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	v, err := st.VM("vm1", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	var img bytes.Buffer
	if err := v.ReadAll(ctx, &img); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(img.Bytes(), want); d >= 0 {
		t.Fatalf("backup image (epoch %d) differs from the RAM file at page %d", ep, d)
	}
}

// firstDiff returns the first page where a and b differ, or -1.
func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return 0
	}
	for p := 0; p*4096 < len(a); p++ {
		if !bytes.Equal(a[p*4096:(p+1)*4096], b[p*4096:(p+1)*4096]) {
			return p
		}
	}
	return -1
}
