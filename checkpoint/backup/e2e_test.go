package backup_test

import (
	"context"
	"encoding/hex"
	"os"
	"testing"
	"time"

	"hostd/checkpoint/memfs"
	"hostd/checkpoint/memfs/memfstest"
)

// TestCheckpointAndLazyRestore runs the whole memory plane: a writer
// process dirties a memfs-served RAM file; writeback streams to the backup
// server over mutual TLS; fsync, device state and a restorable commit make
// a restore point; then, after a restart of the backup server, a restoring
// host's stream fetches the device state and a fresh memfs serves the image
// lazily from the backup over the same mutual TLS, and a new process reads
// back exactly what the first one wrote.
func TestCheckpointAndLazyRestore(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The stream reads pages for a resync from the RAM file itself.
	var ramPath string
	src := &lazyFile{}
	s := e.client(t, "vm1", src)
	defer s.Close()
	fs, err := memfs.Mount(ctx, t.TempDir(), memfs.Options{Size: imgSize, Sink: s, QueueBytes: 2 << 20, DirtyCap: 6 << 20, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Unmount() // on failure paths; the explicit Unmount below comes first
	ramPath = fs.Path()
	src.path = ramPath

	want := make([]byte, imgSize)
	for seed := uint64(1); seed <= 3; seed++ {
		if _, err := memfstest.Run(ctx, memfstest.Spec{Path: ramPath, Size: imgSize, Mode: "scribble", Seed: seed, Count: 4000}); err != nil {
			t.Fatal(err)
		}
		memfstest.Pattern(want, seed, 4000)
		if seed < 3 {
			if _, err := s.Commit(ctx, false); err != nil { // a mid-run epoch
				t.Fatal(err)
			}
		}
	}
	// The writer's fsync was a barrier already; the daemon's own Sync is
	// the one of an evacuation (VM paused, nothing dirty may stay behind).
	if err := fs.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.SendDeviceState(ctx, []byte("qemu device state")); err != nil {
		t.Fatal(err)
	}
	ep, err := s.Commit(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restore point epoch %d, memfs %+v", ep, fs.Stats())
	if err := fs.Unmount(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	e.stop()

	e.addr, e.stop = startServer(t, e.pki, e.store, "127.0.0.1:0")
	rs := e.client(t, "vm1", nil)
	defer rs.Close()
	if st := rs.Stats(); st.Acked != ep {
		t.Fatalf("restoring stream sees epoch %d, want %d", st.Acked, ep)
	}
	state, err := rs.RestoreState(ctx)
	if err != nil || string(state) != "qemu device state" {
		t.Fatalf("device state %q: %v", state, err)
	}
	rfs, err := memfs.Mount(ctx, t.TempDir(), memfs.Options{Size: imgSize, Sink: rs, Source: rs, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer rfs.Unmount()
	var pages []int64
	for p := int64(0); p < imgSize/4096; p += 7 {
		pages = append(pages, p)
	}
	res, err := memfstest.Run(ctx, memfstest.Spec{Path: rfs.Path(), Size: imgSize, Mode: "read", Pages: pages, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range pages {
		if w := hex.EncodeToString(want[p*4096 : p*4096+16]); res.Heads[i] != w {
			t.Fatalf("restored page %d reads %s, want %s", p, res.Heads[i], w)
		}
	}
	if rfs.Stats().Reads == 0 {
		t.Fatal("restore did not fault pages from the store")
	}
	t.Logf("restore: %+v", rfs.Stats())
}

// lazyFile opens its path on first use (the RAM file exists only once
// memfs is mounted, after the stream that needs it as a Source).
type lazyFile struct{ path string }

func (l *lazyFile) ReadAt(p []byte, off int64) (int, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.ReadAt(p, off)
}
