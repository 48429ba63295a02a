package memfs

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"hostd/checkpoint/bdi"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"hostd/checkpoint/memfs/memfstest"
)

func TestMain(m *testing.M) {
	memfstest.Main()
	os.Exit(m.Run())
}

func writer(t *testing.T, spec memfstest.Spec) memfstest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := memfstest.Run(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("memfs needs root for a direct FUSE mount")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
}

func mount(t *testing.T, opts Options) *FS {
	t.Helper()
	needRoot(t)
	opts.Logger = quiet()
	fs, err := Mount(context.Background(), t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fs.Unmount() })
	return fs
}

func sinkFile(t *testing.T, size int64) *os.File {
	f, err := os.Create(filepath.Join(t.TempDir(), "sink"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	t.Cleanup(func() { f.Close() })
	return f
}

// TestMmapWritesReachSink: another process's MAP_SHARED writes come out of
// the sink, byte for byte, after its fsync; fresh pages read as zeros.
func TestMmapWritesReachSink(t *testing.T) {
	const size = 32 << 20
	sink := sinkFile(t, size)
	fs := mount(t, Options{Size: size, Sink: FileSink{sink}})
	res := writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "read", Pages: []int64{0, 1, 8191}})
	for i, h := range res.Heads {
		if h != strings.Repeat("0", 32) {
			t.Fatalf("fresh page %d reads %s", i, h)
		}
	}
	writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "scribble", Seed: 1, Count: 3000})
	want := make([]byte, size)
	memfstest.Pattern(want, 1, 3000)
	got := make([]byte, size)
	sink.ReadAt(got, 0)
	if !bytes.Equal(got, want) {
		t.Fatal("sink differs from what was written through the mapping")
	}
	st := fs.Stats()
	if st.Unaligned != 0 || st.BytesDelivered != st.BytesWritten || st.Barriers == 0 {
		t.Fatalf("stats %+v", st)
	}
	t.Logf("stats %+v", st)
	// write(2) through the writeback cache arrives as whole pages too.
	f, err := os.OpenFile(fs.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("hello"), 4097); err != nil {
		t.Fatal(err)
	}
	copy(want[4097:], "hello")
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	sink.ReadAt(got, 0)
	if !bytes.Equal(got, want) || fs.Stats().Unaligned != 0 {
		t.Fatal("write(2) did not reach the sink as whole pages")
	}
}

func TestFixedSizeAndErrors(t *testing.T) {
	const size = 1 << 20
	fs := mount(t, Options{Size: size, Sink: FileSink{sinkFile(t, size)}})
	if err := os.Truncate(fs.Path(), 2*size); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("grow: %v", err)
	}
	f, err := os.OpenFile(fs.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// With the writeback cache the kernel takes a write past the end into
	// its cache; the refusal comes at writeback, and fsync reports it.
	if _, err := f.WriteAt([]byte{1}, size); err == nil {
		if err := f.Sync(); err == nil {
			t.Fatal("write past the end accepted and synced")
		} else {
			t.Logf("write past the end: fsync: %v", err)
		}
	}
	if st, err := os.Stat(fs.Path()); err != nil || st.Size() != size {
		t.Logf("size after write past the end: %v %v", st.Size(), err)
	}
	if _, err := os.Create(filepath.Join(filepath.Dir(fs.Path()), "other")); err == nil {
		t.Fatal("created a second file")
	}
	if err := fs.SetDirtyCap(fs.QueueBytes()); err == nil {
		t.Fatal("cap that leaves no room for dirty pages accepted")
	}
	if _, err := Mount(context.Background(), t.TempDir(), Options{Size: 100, Sink: FileSink{}}); err == nil {
		t.Fatal("unaligned size accepted")
	}
}

// patternSource serves a recognisable pattern: what a lazy restore's
// fetcher would return.
type patternSource struct {
	mu    sync.Mutex
	reads int
}

func (p *patternSource) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.reads
}

func (p *patternSource) ReadPages(_ context.Context, off int64, b []byte) error {
	p.mu.Lock()
	p.reads++
	p.mu.Unlock()
	clear(b) // memfs may hand over a reused buffer
	for i := 0; i < len(b); i += PageSize {
		copy(b[i:], strconv.FormatInt((off+int64(i))/PageSize, 10)+"|")
	}
	return nil
}

func TestReadsComeFromSource(t *testing.T) {
	const size = 4 << 20
	src := &patternSource{}
	fs := mount(t, Options{Size: size, Sink: FileSink{sinkFile(t, size)}, Source: src})
	res := writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "read", Pages: []int64{0, 5, 1023}, NoSync: true})
	for i, p := range []int{0, 5, 1023} {
		want := hex.EncodeToString([]byte(strconv.Itoa(p) + "|"))
		if !strings.HasPrefix(res.Heads[i], want) {
			t.Fatalf("page %d reads %s, want prefix %s", p, res.Heads[i], want)
		}
	}
	if src.count() == 0 || fs.Stats().Reads == 0 {
		t.Fatal("source never asked")
	}
	// Store (prefetch) puts a page in the cache without the source.
	page := bytes.Repeat([]byte{0xab}, PageSize)
	if err := fs.Store(900*PageSize, page); err != nil {
		t.Fatal(err)
	}
	before := src.count()
	res = writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "read", Pages: []int64{900}, NoSync: true})
	if res.Heads[0] != strings.Repeat("ab", 16) {
		t.Fatalf("stored page reads %s", res.Heads[0])
	}
	if src.count() != before {
		t.Fatal("stored page was fetched from the source")
	}
}

// slowSink delivers at most rate bytes per second by sleeping: a stand-in
// for a backup link of known bandwidth. It tracks the largest backlog
// it observes from the mount: bdi dirty + writeback + memfs queue.
type slowSink struct {
	rate float64
	f    *os.File
	t0   time.Time
	sent int64
}

func (s *slowSink) WritePages(ctx context.Context, off int64, data []byte) error {
	if s.t0.IsZero() {
		s.t0 = time.Now()
	}
	s.sent += int64(len(data))
	due := s.t0.Add(time.Duration(float64(s.sent) / s.rate * float64(time.Second)))
	select {
	case <-time.After(time.Until(due)):
	case <-ctx.Done():
		return ctx.Err()
	}
	_, err := s.f.WriteAt(data, off)
	return err
}

func (s *slowSink) Flush(context.Context) error { return nil }

// TestThrottleHoldsCap: a writer dirtying the mapping far faster than the
// sink absorbs is held by the kernel: the mount's dirty + writeback pages
// never exceed the bdi limit by more than the kernel's slack.
func TestThrottleHoldsCap(t *testing.T) {
	const size = 64 << 20
	sink := &slowSink{rate: 40e6, f: sinkFile(t, size)}
	const capBytes = 12 << 20
	if err := bdi.MountDebugfs(); err != nil {
		t.Log(err)
	}
	fs := mount(t, Options{Size: size, Sink: sink, QueueBytes: 4 << 20, DirtyCap: capBytes})
	lim, err := fs.DirtyLimit()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("bdi %v max_bytes %d (asked %d)", fs.BDI(), lim, capBytes-(4<<20))
	stop := make(chan struct{})
	var peak int64
	var samples int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 100000; i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			d, ok := fs.BDI().Unflushed()
			if !ok {
				return
			}
			samples++
			peak = max(peak, d)
		}
	}()
	// Dirty 3x the file: 192 MiB at 40 MB/s is about 5 s of sink time.
	res := writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "passes", Passes: 3, Lock: true})
	final := res.Fsync
	close(stop)
	<-done
	if samples == 0 {
		t.Skip("bdi stats not readable (debugfs)")
	}
	t.Logf("peak bdi dirty+writeback %.1f MiB over %d samples, limit %.1f MiB; final fsync %v", float64(peak)/(1<<20), samples, float64(lim)/(1<<20), final)
	// The kernel enforces the bdi limit with a slack of its per-CPU
	// counters' batches; allow that much, no more.
	slack := int64(4 << 20)
	if peak > lim+slack {
		t.Fatalf("dirty pages reached %d bytes, limit %d", peak, lim)
	}
}

// countingZero is a ZeroSource that counts its reads.
type countingZero struct {
	mu sync.Mutex
	n  int
}

func (c *countingZero) ReadPages(ctx context.Context, off int64, p []byte) error {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	clear(p)
	return nil
}

func (c *countingZero) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// evict asks the kernel to drop the file's clean pages that nobody holds.
func evict(t *testing.T, path string) {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// TestWrittenPagesSurviveEviction: after the kernel is told to drop the
// file's clean pages, pages that were written back still read their newest
// content (memfs locked them), and unwritten pages come from the Source
// again. Without pinning the same reads hit a written page that left the
// cache: EIO, and the mapping reader dies of SIGBUS, never stale data.
func TestWrittenPagesSurviveEviction(t *testing.T) {
	const size = 16 << 20
	for _, noPin := range []bool{false, true} {
		src := &countingZero{}
		fs := mount(t, Options{Size: size, Sink: FileSink{sinkFile(t, size)}, Source: src, NoPin: noPin})
		writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "scribble", Seed: 5, Count: 500})
		want := make([]byte, size)
		memfstest.Pattern(want, 5, 500)
		var pages []int64
		for p := int64(0); p < size/PageSize; p++ {
			pages = append(pages, p)
		}
		evict(t, fs.Path())
		before := src.count()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		res, err := memfstest.Run(ctx, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "read", Pages: pages, NoSync: true})
		cancel()
		st := fs.Stats()
		if noPin {
			if err == nil {
				t.Fatal("without pinning, evicted written pages were read back without error")
			}
			t.Logf("without pinning: %v", err)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for i, p := range pages {
			if w := hex.EncodeToString(want[p*PageSize : p*PageSize+16]); res.Heads[i] != w {
				t.Fatalf("page %d reads %s after eviction, want %s", p, res.Heads[i], w)
			}
		}
		if src.count() == before {
			t.Fatal("nothing was evicted: the test proves nothing")
		}
		if st.PinnedBytes == 0 || st.PinFailures != 0 {
			t.Fatalf("stats %+v", st)
		}
		t.Logf("pinned %d KiB; %d source reads after eviction", st.PinnedBytes>>10, src.count()-before)
	}
}
