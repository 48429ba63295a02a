package restore_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/backup"
	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/memfs"
	"hostd/checkpoint/memfs/memfstest"
	"hostd/checkpoint/pki"
	"hostd/checkpoint/restore"
)

const imgSize = 32 << 20

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestMain doubles as the guest process (memfstest) and as a backup server
// process that a test can kill with SIGKILL.
func TestMain(m *testing.M) {
	memfstest.Main()
	if spec := os.Getenv("RESTORE_BACKUP_CHILD"); spec != "" {
		serverChild(spec)
		return
	}
	os.Exit(m.Run())
}

func serverChild(spec string) {
	parts := strings.SplitN(spec, "|", 3)
	st, err := backupstore.Open(parts[1], backupstore.Options{Logger: quiet()})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	tc, err := pki.DirServerConfig(parts[0])
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	srv, _ := backup.New(st, tc, backup.Options{Logger: quiet()})
	ln, err := net.Listen("tcp", parts[2])
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	fmt.Println("listening", ln.Addr())
	// Exit on our own if the parent never kills us.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv.Serve(ctx, ln)
}

// backupProc is a backup server in a child process.
type backupProc struct {
	t          *testing.T
	pki, store string
	addr       string
	cmd        *exec.Cmd
}

func startBackup(t *testing.T) *backupProc {
	b := &backupProc{t: t, pki: t.TempDir(), store: t.TempDir(), addr: "127.0.0.1:0"}
	if err := pki.Generate(b.pki, pki.Spec{ServerNames: []string{"127.0.0.1"}, Hosts: []string{"host1"}}); err != nil {
		t.Fatal(err)
	}
	b.start()
	t.Cleanup(b.kill)
	return b
}

func (b *backupProc) start() {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "RESTORE_BACKUP_CHILD="+b.pki+"|"+b.store+"|"+b.addr)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "listening ") {
		cmd.Process.Kill()
		cmd.Wait()
		b.t.Fatalf("backup child: %q %v", line, err)
	}
	b.addr = strings.TrimSpace(strings.TrimPrefix(line, "listening "))
	b.cmd = cmd
}

func (b *backupProc) kill() {
	if b.cmd != nil {
		b.cmd.Process.Signal(syscall.SIGKILL)
		b.cmd.Wait()
		b.cmd = nil
	}
}

func (b *backupProc) tls() *tls.Config {
	tc, err := pki.DirClientConfig(b.pki, "host1", "127.0.0.1")
	if err != nil {
		b.t.Fatal(err)
	}
	return tc
}

// checkpoint runs a guest process against a protected memfs: three epochs
// of scribbles over the first half of the image (the rest stays zero), the
// last one a restore point with device state. It returns the image the
// guest wrote.
func checkpoint(t *testing.T, b *backupProc, vm string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := backupclient.Open(ctx, backupclient.Config{Addr: b.addr, TLS: b.tls(), VMID: vm, ImageSize: imgSize, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fs, err := memfs.Mount(ctx, t.TempDir(), memfs.Options{Size: imgSize, Sink: s, QueueBytes: 2 << 20, DirtyCap: 8 << 20, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Unmount()
	want := make([]byte, imgSize)
	for seed := uint64(1); seed <= 3; seed++ {
		if _, err := memfstest.Run(ctx, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "scribble", Seed: seed, Count: 3000, Span: imgSize / 2}); err != nil {
			t.Fatal(err)
		}
		spanned := want[:imgSize/2]
		memfstest.Pattern(spanned, seed, 3000)
		if seed < 3 {
			if _, err := s.Commit(ctx, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := fs.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.SendDeviceState(ctx, []byte("device state of "+vm)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(ctx, true); err != nil {
		t.Fatal(err)
	}
	return want
}

// events records a restore's events.
type events struct {
	mu  sync.Mutex
	all []restore.Event
}

func (e *events) add(ev restore.Event) {
	e.mu.Lock()
	e.all = append(e.all, ev)
	e.mu.Unlock()
}

func (e *events) count(typ string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, ev := range e.all {
		if ev.Type == typ {
			n++
		}
	}
	return n
}

// waitFor polls cond for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

func open(t *testing.T, b *backupProc, vm string, ev *events, mut func(*restore.Config)) *restore.Restorer {
	t.Helper()
	cfg := restore.Config{Backup: b.addr, TLS: b.tls(), ID: vm, Size: imgSize, CacheFile: filepath.Join(t.TempDir(), "cache"),
		Logger: quiet(), OnEvent: ev.add, AttemptTimeout: 3 * time.Second, MaxBackoff: 200 * time.Millisecond}
	if mut != nil {
		mut(&cfg)
	}
	r, err := restore.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// mountRestored mounts a fresh memfs served by r (the restored VM is not
// protected: its writes go to a local file).
func mountRestored(t *testing.T, r *restore.Restorer) *memfs.FS {
	t.Helper()
	sink, err := os.Create(filepath.Join(t.TempDir(), "sink"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sink.Close() })
	fs, err := memfs.Mount(context.Background(), t.TempDir(), memfs.Options{Size: imgSize, Sink: memfs.FileSink{F: sink}, Source: r.Source(), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fs.Unmount() })
	return fs
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func pageCRC(img []byte, p int64) uint32 { return crc32.Checksum(img[p*4096:(p+1)*4096], castagnoli) }

func allPages() []int64 {
	var ps []int64
	for p := int64(0); p < imgSize/4096; p++ {
		ps = append(ps, p)
	}
	return ps
}

// guest runs a guest process (a separate process: see memfstest).
func guest(t *testing.T, spec memfstest.Spec) memfstest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := memfstest.Run(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// checkHash compares a "hash" result over pages with img.
func checkHash(t *testing.T, what string, img []byte, pages []int64, res memfstest.Result) {
	t.Helper()
	if len(res.Sums) != len(pages) {
		t.Fatalf("%s: %d sums for %d pages", what, len(res.Sums), len(pages))
	}
	for i, p := range pages {
		if res.Sums[i] != pageCRC(img, p) {
			t.Fatalf("%s: page %d reads crc %08x, want %08x", what, p, res.Sums[i], pageCRC(img, p))
		}
	}
}

// evict drops the RAM file's clean pages from the page cache (a system
// call from this process: no fault on the mapping).
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

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
}

// TestLazyRestore: a guest process reads a lazily restored RAM file and
// sees exactly what the first guest wrote, zero pages never crossing the
// wire; the prefetcher brings the rest and the restore becomes fully
// resident; with the backup gone and the page cache dropped, every page
// still reads right, now from the cache file.
func TestLazyRestore(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	ev := &events{}
	r := open(t, b, "vm1", ev, nil)
	if string(r.State()) != "device state of vm1" || r.Epoch() != 3 {
		t.Fatalf("state %q epoch %d", r.State(), r.Epoch())
	}
	fs := mountRestored(t, r)

	var some []int64
	for p := int64(0); p < imgSize/4096; p += 128 {
		some = append(some, p)
	}
	checkHash(t, "lazy read", want, some, guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", Pages: some, NoSync: true}))
	st := r.Status()
	t.Logf("after lazy reads: %+v", st)
	if st.RemoteFaults == 0 || st.FetchedBytes == 0 {
		t.Fatal("no page came from the backup")
	}
	if st.FetchedBytes >= st.TotalBytes || st.ZeroBytes < imgSize/2 {
		t.Fatalf("fetched %d bytes of %d non-zero (zero %d): zero pages crossed the wire", st.FetchedBytes, st.TotalBytes, st.ZeroBytes)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := r.Run(ctx, fs); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.Resident():
	default:
		t.Fatal("Run returned but Resident is open")
	}
	st = r.Status()
	t.Logf("after prefetch: %+v; memfs %+v", st, fs.Stats())
	if !st.FullyResident || st.PresentBytes != st.TotalBytes || st.PrefetchedBytes == 0 || st.PreloadedBytes == 0 || ev.count(restore.EventResident) != 1 {
		t.Fatalf("not fully resident: %+v, %d resident events", st, ev.count(restore.EventResident))
	}
	if st.FetchedBytes > st.TotalBytes {
		t.Fatalf("fetched %d bytes, only %d to bring: pages fetched twice", st.FetchedBytes, st.TotalBytes)
	}

	b.kill()
	reads := fs.Stats().Reads
	evict(t, fs.Path())
	checkHash(t, "after eviction, backup gone", want, allPages(), guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", NoSync: true}))
	if fs.Stats().Reads == reads {
		t.Fatal("nothing was evicted: the test proves nothing")
	}
	t.Logf("re-read %d READs from the cache file with the backup gone", fs.Stats().Reads-reads)
}

// TestBackupOutageDuringLazyRestore: the backup process is killed while a
// guest is faulting its pages in; the guest waits, the events say the
// backup is unreachable; once a new backup process serves the same store
// the guest continues and reads correct data.
func TestBackupOutageDuringLazyRestore(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	ev := &events{}
	r := open(t, b, "vm1", ev, func(c *restore.Config) { c.PrefetchRate = 4 << 20 })
	fs := mountRestored(t, r)
	// Some pages come while the backup is up; a slow prefetcher runs
	// across the outage too.
	checkHash(t, "before the outage", want, []int64{1, 2, 3}, guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", Pages: []int64{1, 2, 3}, NoSync: true}))
	pctx, pcancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer pcancel()
	prefetched := make(chan error, 1)
	go func() { prefetched <- r.Run(pctx, fs) }()
	b.kill()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	type result struct {
		res memfstest.Result
		err error
	}
	done := make(chan result, 1)
	pages := allPages()
	go func() {
		res, err := memfstest.Run(ctx, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", Pages: pages, NoSync: true})
		done <- result{res, err}
	}()
	if !waitFor(30*time.Second, func() bool { return ev.count(restore.EventUnreachable) > 0 }) {
		t.Fatal("no unreachable event while the backup is down")
	}
	select {
	case res := <-done:
		t.Fatalf("guest finished with the backup down: %v", res.err)
	case <-time.After(500 * time.Millisecond):
	}
	if !r.Status().Unreachable {
		t.Fatal("status does not say unreachable")
	}
	b.start() // same store, same address
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	checkHash(t, "across the outage", want, pages, res.res)
	if err := <-prefetched; err != nil {
		t.Fatalf("prefetch across the outage: %v", err)
	}
	if ev.count(restore.EventBack) != 1 || r.Status().Unreachable || !r.Status().FullyResident {
		t.Fatalf("events %+v status %+v", ev.all, r.Status())
	}
	st := r.Status()
	t.Logf("status %+v", st)
	if st.Outages != 1 {
		t.Fatalf("outages %d", st.Outages)
	}
}

// TestCorruptPageRefused: a bit flipped in the backup's image file is
// detected on the restoring host and reported; a guest reading that page
// gets EIO, never the wrong data, while its neighbours read right; the
// prefetcher brings everything else and says what it could not.
func TestCorruptPageRefused(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	var bad int64 = -1
	for p := int64(100); p < imgSize/4096; p++ {
		if pageCRC(want, p) != pageCRC(make([]byte, 4096), 0) {
			bad = p
			break
		}
	}
	img, err := os.OpenFile(filepath.Join(b.store, "vm1", "image"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	one := make([]byte, 1)
	img.ReadAt(one, bad*4096+123)
	img.WriteAt([]byte{one[0] ^ 0x08}, bad*4096+123)
	img.Close()

	ev := &events{}
	r := open(t, b, "vm1", ev, nil)
	fs := mountRestored(t, r)
	pages := []int64{bad - 1, bad, bad + 1}
	res, err := memfstest.Run(context.Background(), memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "pread", Pages: pages, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Errors[1], "input/output error") {
		t.Fatalf("corrupt page %d read: sum %08x error %q", bad, res.Sums[1], res.Errors[1])
	}
	for _, i := range []int{0, 2} {
		if res.Errors[i] != "" || res.Sums[i] != pageCRC(want, pages[i]) {
			t.Fatalf("neighbour page %d: %08x %q", pages[i], res.Sums[i], res.Errors[i])
		}
	}
	if ev.count(restore.EventCorrupt) != 1 || r.Status().CorruptPages != 1 {
		t.Fatalf("corruption not reported once: events %+v", ev.all)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err = r.Run(ctx, fs)
	if !errors.Is(err, restore.ErrCorrupt) {
		t.Fatalf("prefetch with a corrupt page: %v", err)
	}
	st := r.Status()
	if st.FullyResident || st.PresentBytes != st.TotalBytes-4096 {
		t.Fatalf("status %+v", st)
	}
	t.Logf("prefetch: %v", err)
}

// TestPrefetchKeepsGuestWrites: a guest process writes pages (some the
// backup holds data for, some zero there), then the prefetcher sweeps the
// whole image: the guest's pages keep its content.
func TestPrefetchKeepsGuestWrites(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	ev := &events{}
	r := open(t, b, "vm1", ev, nil)
	fs := mountRestored(t, r)
	stamped := []int64{7, 8, 500, 1000, 3000, imgSize/4096 - 1}
	guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "stamp", Seed: 0xee, Pages: stamped})
	for _, p := range stamped {
		for i := p * 4096; i < (p+1)*4096; i++ {
			want[i] = 0xee
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := r.Run(ctx, fs); err != nil {
		t.Fatal(err)
	}
	checkHash(t, "after prefetch", want, allPages(), guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", NoSync: true}))
	st := r.Status()
	t.Logf("status %+v; memfs %+v", st, fs.Stats())
	if st.StoresSkipped == 0 || !st.FullyResident {
		t.Fatalf("status %+v", st)
	}
}

// TestFullRestore: Full copies the restore point into the cache file
// before anything is mounted; the mounted file then reads right with the
// backup gone.
func TestFullRestore(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	ev := &events{}
	r := open(t, b, "vm1", ev, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := r.Full(ctx); err != nil {
		t.Fatal(err)
	}
	st := r.Status()
	if !st.FullyResident || st.FetchedBytes != st.TotalBytes || ev.count(restore.EventResident) != 1 {
		t.Fatalf("status %+v", st)
	}
	b.kill()
	fs := mountRestored(t, r)
	checkHash(t, "full restore", want, allPages(), guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", NoSync: true}))
	if r.Status().RemoteFaults != 0 {
		t.Fatal("a fault went to the backup after a full restore")
	}
	t.Logf("status %+v", r.Status())
}

// TestOpenRefusals: an epoch the backup does not keep and an unknown VM
// fail Open with the backup's reason; a dead backup fails it at once.
func TestOpenRefusals(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	checkpoint(t, b, "vm1")
	cfg := restore.Config{Backup: b.addr, TLS: b.tls(), ID: "vm1", Epoch: 2, Size: imgSize, CacheFile: filepath.Join(t.TempDir(), "c"), Logger: quiet()}
	_, err := restore.Open(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "epoch 3") {
		t.Fatalf("epoch 2: %v", err)
	}
	t.Logf("epoch 2: %v", err)
	cfg.Epoch, cfg.ID = 0, "vm2"
	if _, err := restore.Open(context.Background(), cfg); err == nil {
		t.Fatal("unknown vm opened")
	}
	b.kill()
	cfg.ID = "vm1"
	cfg.AttemptTimeout = 2 * time.Second
	if _, err := restore.Open(context.Background(), cfg); err == nil {
		t.Fatal("opened with the backup dead")
	}
}

// TestBackupFrozen: a backup that stops answering without closing its
// connections (SIGSTOP) is a stall: each attempt gives up after its
// timeout, the outage is reported, and the guest continues with correct
// data once the backup runs again.
func TestBackupFrozen(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	ev := &events{}
	r := open(t, b, "vm1", ev, func(c *restore.Config) { c.AttemptTimeout = time.Second })
	fs := mountRestored(t, r)
	b.cmd.Process.Signal(syscall.SIGSTOP)
	defer b.cmd.Process.Signal(syscall.SIGCONT) // before the cleanup's kill
	pages := []int64{0, 1000, 2000, 3000}
	done := make(chan error, 1)
	var res memfstest.Result
	go func() {
		var err error
		res, err = memfstest.Run(context.Background(), memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", Pages: pages, NoSync: true})
		done <- err
	}()
	if !waitFor(30*time.Second, func() bool { return ev.count(restore.EventUnreachable) > 0 }) {
		t.Fatal("a frozen backup was never reported unreachable")
	}
	b.cmd.Process.Signal(syscall.SIGCONT)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("guest still waiting a minute after the backup resumed")
	}
	checkHash(t, "after the freeze", want, pages, res)
	if !waitFor(10*time.Second, func() bool { return ev.count(restore.EventBack) == 1 }) {
		t.Fatalf("events %+v", ev.all)
	}
	t.Logf("status %+v", r.Status())
}

// TestBackupLostTheVM: a backup that comes back without the VM (its store
// not there yet) is reported, and the guest waits; once the store is back
// the guest reads correct data.
func TestBackupLostTheVM(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	ev := &events{}
	r := open(t, b, "vm1", ev, nil)
	fs := mountRestored(t, r)
	checkHash(t, "before", want, []int64{1}, guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", Pages: []int64{1}, NoSync: true}))
	b.kill()
	vmDir, aside := filepath.Join(b.store, "vm1"), filepath.Join(b.store, "aside")
	if err := os.Rename(vmDir, aside); err != nil {
		t.Fatal(err)
	}
	b.start()
	done := make(chan error, 1)
	var res memfstest.Result
	go func() {
		var err error
		res, err = memfstest.Run(context.Background(), memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", Pages: []int64{1, 3000}, NoSync: true})
		done <- err
	}()
	if !waitFor(30*time.Second, func() bool { return ev.count(restore.EventRefused) == 1 }) {
		t.Fatalf("no refusal reported: %+v", ev.all)
	}
	select {
	case err := <-done:
		t.Fatalf("guest finished while the backup lacks the vm: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	b.kill()
	if err := os.Rename(aside, vmDir); err != nil {
		t.Fatal(err)
	}
	b.start()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	checkHash(t, "after the store came back", want, []int64{1, 3000}, res)
	t.Logf("events %+v", ev.all)
}
