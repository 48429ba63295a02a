package swapdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"hostd/dataplane/nbd"
	"hostd/dataplane/repo"
	"hostd/dataplane/repo/repotest"
)

// env is a swap device served over NBD on a unix socket, backed by real
// repositories over mutual TLS on loopback.
type env struct {
	t     testing.TB
	pki   string
	repos []*repotest.Repo
	dev   *Device
	sock  string
	c     *nbd.Client
	model []byte // what the device must hold
}

func newEnv(t testing.TB, size int64, nrepos int, cfg Config) *env {
	t.Helper()
	e := &env{t: t, pki: repotest.PKI(t, "hostA"), model: make([]byte, size)}
	for range nrepos {
		e.repos = append(e.repos, repotest.Start(t, e.pki, repo.ServerOptions{Capacity: 64 << 20, OrphanTimeout: time.Minute}))
	}
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "swap.img")
	}
	cfg.Size = size
	for _, r := range e.repos {
		cfg.Repos = append(cfg.Repos, RepoConfig{Addr: r.Addr, TLS: repotest.ClientTLS(t, e.pki, "hostA")})
	}
	if cfg.RetryMax == 0 {
		cfg.RetryMin, cfg.RetryMax = 50*time.Millisecond, 200*time.Millisecond
	}
	ctx := context.Background()
	dev, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.dev = dev
	for _, c := range dev.Repos() {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := c.WaitConnected(wctx); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	e.sock = filepath.Join(t.TempDir(), "swap.sock")
	ln, err := net.Listen("unix", e.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := nbd.NewServer(dev, nbd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { srv.Serve(sctx, ln); close(done) }()
	t.Cleanup(func() {
		if e.c != nil {
			e.c.Close()
		}
		cancel()
		<-done
		dev.Close()
	})
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	defer dcancel()
	e.c, err = nbd.Dial(dctx, "unix", e.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	e.t.Cleanup(cancel)
	return ctx
}

// write writes through NBD and into the model.
func (e *env) write(off int64, p []byte) error {
	err := e.c.WriteAt(e.ctx(), p, off, false)
	if err == nil {
		copy(e.model[off:], p)
	}
	return err
}

func (e *env) fill(off int64, n int, seed uint64) []byte {
	p := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(off >> 12), byte(off >> 20)})
	r.Read(p)
	return p
}

// verify reads the whole device through NBD in 1 MiB requests and
// compares it with the model.
func (e *env) verify(what string) {
	e.t.Helper()
	size := int64(len(e.model))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		if err := e.c.ReadAt(e.ctx(), buf[:n], off); err != nil {
			e.t.Fatalf("%s: read at %d: %v", what, off, err)
		}
		if !bytes.Equal(buf[:n], e.model[off:off+n]) {
			for k := int64(0); k < n; k++ {
				if buf[k] != e.model[off+k] {
					e.t.Fatalf("%s: device differs from what was written at byte %d", what, off+k)
				}
			}
		}
	}
}

// TestRoundTrip: pages of many sizes and alignments, written through NBD,
// read back equal; they are in the repositories and, after Flush, in the
// local file too.
func TestRoundTrip(t *testing.T) {
	const size = 16 << 20
	e := newEnv(t, size, 2, Config{})
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		var off int64
		var n int
		switch i % 4 {
		case 0: // a swap page
			off, n = int64(r.IntN(size/PageSize))*PageSize, PageSize
		case 1: // a cluster of pages
			off, n = int64(r.IntN(size/PageSize-64))*PageSize, PageSize*(1+r.IntN(64))
		case 2: // sectors inside a page
			off, n = int64(r.IntN(size/512-8))*512, 512*(1+r.IntN(8))
		case 3: // large, unaligned to pages
			off, n = int64(r.IntN(size/512-4096))*512, 512*(1+r.IntN(4096))
		}
		if err := e.write(off, e.fill(off, n, uint64(i))); err != nil {
			t.Fatalf("write %d bytes at %d: %v", n, off, err)
		}
	}
	e.verify("after writes")
	st := e.dev.Stats()
	t.Logf("stats: remote %d local-only %d queued %d, read from repo %d disk %d queue %d, ops/s %.0f",
		st.PagesRemote, st.PagesLocalOnly, st.PagesQueued, st.PagesReadRemote, st.PagesReadLocal, st.PagesReadQueue, st.OpsPerSec)
	if st.PagesRemote == 0 || st.PagesLocalOnly != 0 {
		t.Errorf("with healthy repositories every written page should be remote: %+v", st)
	}
	if st.Repos[0].Pages == 0 || st.Repos[1].Pages == 0 {
		t.Errorf("pages not spread over both repositories: %d and %d", st.Repos[0].Pages, st.Repos[1].Pages)
	}
	if st.WriteLatency.Count != 200 || st.ReadLatency.Count == 0 || st.Errors != 0 {
		t.Errorf("counters: %d writes timed, %d reads, %d errors", st.WriteLatency.Count, st.ReadLatency.Count, st.Errors)
	}
	if err := e.c.Flush(e.ctx()); err != nil {
		t.Fatal(err)
	}
	local, err := os.ReadFile(e.dev.cfg.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(local, e.model) {
		t.Fatal("after Flush the local file does not hold what was written")
	}
	// Trim releases pages everywhere.
	if err := e.c.Trim(e.ctx(), 0, size); err != nil {
		t.Fatal(err)
	}
	clear(e.model)
	e.verify("after trim")
	waitFor(t, "trimmed pages to leave the repositories", func() bool {
		return e.repos[0].Server.Status().Used == 0 && e.repos[1].Server.Status().Used == 0
	})
	if st := e.dev.Stats(); st.PagesRemote != 0 || st.PagesLocalOnly != 0 {
		t.Errorf("after trimming everything: %d remote, %d local pages", st.PagesRemote, st.PagesLocalOnly)
	}
}

// TestQemuIO: QEMU's NBD client writes and verifies patterns on the device.
func TestQemuIO(t *testing.T) {
	qio, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed (apt-get install qemu-utils)")
	}
	e := newEnv(t, 16<<20, 1, Config{})
	ctx := e.ctx()
	out, err := exec.CommandContext(ctx, qio, "-f", "raw", "nbd+unix:///?socket="+e.sock,
		"-c", "write -P 0x5c 0 4M",
		"-c", "write -P 0x3a 1M 4k",
		"-c", "write -P 0x77 2M 512",
		"-c", "aio_write -P 0x11 8M 1M",
		"-c", "aio_write -P 0x22 9M 1M",
		"-c", "aio_flush",
		"-c", "read -P 0x5c 0 1M",
		"-c", "read -P 0x3a 1M 4k",
		"-c", "read -P 0x77 2M 512",
		"-c", "read -P 0x5c 2099712 1M",
		"-c", "read -P 0x11 8M 1M",
		"-c", "read -P 0x22 9M 1M",
		"-c", "discard 8M 2M",
		"-c", "read -P 0 8M 2M",
		"-c", "flush",
	).CombinedOutput()
	t.Logf("qemu-io:\n%s", out)
	if err != nil || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io: %v", err)
	}
	if st := e.dev.Stats(); st.PagesRemote == 0 {
		t.Error("qemu-io's pages did not reach the repository")
	}
}

// TestRepoKilledAndRestarted: with the repository gone, reads come from the
// local file and writes stay local; nothing is corrupt; the restarted
// repository is used again.
func TestRepoKilledAndRestarted(t *testing.T) {
	const size = 8 << 20
	e := newEnv(t, size, 1, Config{})
	for i := range size / (64 << 10) {
		off := int64(i) * 64 << 10
		if err := e.write(off, e.fill(off, 64<<10, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if st := e.dev.Stats(); st.PagesRemote != size/PageSize {
		t.Fatalf("%d pages remote before the kill, want all %d", st.PagesRemote, size/PageSize)
	}
	// Kill it with writes in flight.
	var wg sync.WaitGroup
	wg.Add(1)
	errs := make(chan error, 1)
	go func() {
		defer wg.Done()
		for i := range 32 {
			off := int64(i) * 128 << 10
			p := e.fill(off, 4096, 2)
			if err := e.c.WriteAt(e.ctx(), p, off, false); err != nil {
				errs <- err
				return
			}
		}
	}()
	e.repos[0].Stop()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("write while the repository died: %v", err)
	}
	for i := range 32 { // the model, after the writer finished
		off := int64(i) * 128 << 10
		copy(e.model[off:], e.fill(off, 4096, 2))
	}
	e.verify("repository killed")
	for i := range 16 {
		off := int64(i)*256<<10 + 8192
		if err := e.write(off, e.fill(off, 8192, 3)); err != nil {
			t.Fatalf("write with the repository down: %v", err)
		}
	}
	e.verify("repository down, after more writes")
	st := e.dev.Stats()
	t.Logf("repository down: remote %d local-only %d, read remote %d local %d, repo errors %d", st.PagesRemote, st.PagesLocalOnly, st.PagesReadRemote, st.PagesReadLocal, st.RepoErrors)
	if st.PagesLocalOnly == 0 || st.Repos[0].Connected {
		t.Errorf("with the repository down: %d local-only pages, connected %v", st.PagesLocalOnly, st.Repos[0].Connected)
	}

	e.repos[0].Restart()
	waitFor(t, "the device to reconnect", func() bool { return e.dev.Repos()[0].Connected() })
	e.verify("repository restarted (empty)")
	before := e.dev.Stats().PagesRemote
	for i := range 16 {
		off := int64(i)*256<<10 + 65536
		if err := e.write(off, e.fill(off, 16384, 4)); err != nil {
			t.Fatal(err)
		}
	}
	e.verify("after writes to the restarted repository")
	st = e.dev.Stats()
	if st.Repos[0].Pages < 64 || e.repos[0].Server.Status().Used < 64*PageSize {
		t.Errorf("restarted repository not used again: device counts %d pages there (before %d), repository holds %d bytes",
			st.Repos[0].Pages, before, e.repos[0].Server.Status().Used)
	}
}

// TestForgedCapabilityFallsBack: a capability the repository refuses (here
// forged in the page table) reads as absent; the device serves its local
// copy and stops using the capability.
func TestForgedCapabilityFallsBack(t *testing.T) {
	e := newEnv(t, 1<<20, 1, Config{})
	p := e.fill(0, 8192, 7)
	if err := e.write(0, p); err != nil {
		t.Fatal(err)
	}
	if err := e.c.Flush(e.ctx()); err != nil {
		t.Fatal(err)
	}
	l := e.dev.lock(1)
	l.Lock()
	ent := e.dev.table[1]
	ent.cap[0] ^= 0xff
	e.dev.table[1] = ent
	l.Unlock()
	e.verify("forged capability")
	st := e.dev.Stats()
	if st.PagesReadLocal == 0 || st.PagesLocalOnly != 1 {
		t.Errorf("forged page: read locally %d, local-only %d (want >0 and 1)", st.PagesReadLocal, st.PagesLocalOnly)
	}
}

// TestReclaim: the repository asks for its memory back; the device moves
// the pages to its local disk and keeps serving them.
func TestReclaim(t *testing.T) {
	const size = 4 << 20
	e := newEnv(t, size, 1, Config{})
	for off := int64(0); off < size; off += 1 << 20 {
		if err := e.write(off, e.fill(off, 1<<20, 8)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := e.repos[0].Server.Reclaim(e.ctx(), "hostA", 1<<20)
	if err != nil || got != 1<<20 {
		t.Fatalf("reclaim: %d %v", got, err)
	}
	st := e.dev.Stats()
	if st.PagesLocalOnly != 256 || st.PagesRemote != size/PageSize-256 || st.ReclaimedPages != 256 {
		t.Errorf("after reclaiming 1 MiB: remote %d local-only %d reclaimed %d", st.PagesRemote, st.PagesLocalOnly, st.ReclaimedPages)
	}
	if used := e.repos[0].Server.Status().Used; used != size-1<<20 {
		t.Errorf("repository holds %d bytes after reclaim", used)
	}
	e.verify("after reclaim")
}

// TestLocalDiskFull: the local file's disk (an 8 MiB tmpfs) fills up under
// a 16 MiB device: the write that does not fit fails with ENOSPC, every
// acknowledged page reads back, and trimming makes room again.
func TestLocalDiskFull(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=8m,mode=0700"); err != nil {
		t.Skipf("mount tmpfs: %v (needs root)", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	const size = 16 << 20
	if _, err := Open(context.Background(), Config{Path: filepath.Join(dir, "pre.img"), Size: size, Preallocate: true}); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("preallocating 16 MiB on 8 MiB: %v, want ENOSPC", err)
	}
	os.Remove(filepath.Join(dir, "pre.img"))

	e := newEnv(t, size, 1, Config{Path: filepath.Join(dir, "swap.img")})
	var full error
	written := 0
	for i := range size / (256 << 10) {
		off := int64(i) * 256 << 10
		if err := e.write(off, e.fill(off, 256<<10, 9)); err != nil {
			full = err
			break
		}
		written++
	}
	t.Logf("%d KiB written before the disk was full: %v", written*256, full)
	if !errors.Is(full, syscall.ENOSPC) {
		t.Fatalf("filling the local disk: %v, want ENOSPC", full)
	}
	if err := e.c.Flush(e.ctx()); err != nil {
		t.Fatalf("flush after ENOSPC (acknowledged writes must be durable): %v", err)
	}
	e.verify("local disk full")
	if st := e.dev.Stats(); st.LocalError != "" {
		t.Errorf("ENOSPC at reservation broke the local file: %s", st.LocalError)
	}
	// Trim the first 2 MiB: the next write fits.
	if err := e.c.Trim(e.ctx(), 0, 2<<20); err != nil {
		t.Fatal(err)
	}
	clear(e.model[:2<<20])
	if err := e.c.Flush(e.ctx()); err != nil { // the punch is queued: let it land
		t.Fatal(err)
	}
	off := int64(written) * 256 << 10
	if err := e.write(off, e.fill(off, 256<<10, 10)); err != nil {
		t.Fatalf("write after trimming: %v", err)
	}
	e.verify("after trim and rewrite")
}

// TestConcurrentWriters: overlapping stripes, concurrent requests; each
// writer owns its pages, so the end state is defined.
func TestConcurrentWriters(t *testing.T) {
	const size = 8 << 20
	e := newEnv(t, size, 2, Config{QueueBytes: 1 << 20})
	var wg sync.WaitGroup
	var mu sync.Mutex
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 9))
			for i := range 100 {
				page := int64(r.IntN(size/PageSize/8))*8 + int64(g) // pages ≡ g mod 8
				off := page * PageSize
				p := e.fill(off, PageSize, uint64(g*1000+i))
				if err := e.c.WriteAt(e.ctx(), p, off, i%10 == 0); err != nil {
					errs <- fmt.Errorf("writer %d: %w", g, err)
					return
				}
				mu.Lock()
				copy(e.model[off:], p)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	e.verify("concurrent writers")
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for range 400 {
		if cond() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}
