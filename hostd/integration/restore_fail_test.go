package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"hostd/checkpoint/memserver"
	"hostd/hostd/client"
	"hostd/hostd/hostdtest"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
)

// eventLog collects a daemon's event stream for a test.
type eventLog struct {
	mu  sync.Mutex
	all []client.Event
}

func watchEvents(t *testing.T, ctx context.Context, c *client.Client) *eventLog {
	t.Helper()
	ch, err := c.Events(ctx)
	if err != nil {
		t.Fatalf("event stream: %v", err)
	}
	l := &eventLog{}
	go func() {
		for e := range ch {
			l.mu.Lock()
			l.all = append(l.all, e)
			l.mu.Unlock()
		}
	}()
	return l
}

// find returns the events of type typ about vm so far.
func (l *eventLog) find(typ, vm string) []client.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []client.Event
	for _, e := range l.all {
		if e.Type == typ && e.VM == vm {
			out = append(out, e)
		}
	}
	return out
}

// wait polls for an event of type typ about vm, up to d.
func (l *eventLog) wait(t *testing.T, typ, vm string, d time.Duration) client.Event {
	t.Helper()
	for end := time.Now().Add(d); ; time.Sleep(100 * time.Millisecond) {
		if es := l.find(typ, vm); len(es) > 0 {
			return es[0]
		}
		if time.Now().After(end) {
			t.Fatalf("no %s event for %s within %v", typ, vm, d)
		}
	}
}

// restoreFails starts a restore that must fail and returns its job.
func restoreFails(t *testing.T, ctx context.Context, c *client.Client, req protect.RestoreRequest) jobs.Job {
	t.Helper()
	j, err := c.Restore(ctx, req)
	if err != nil {
		t.Fatalf("start restore of %s: %v", req.Name, err)
	}
	if j, err = c.WaitJob(ctx, j.ID); err != nil {
		t.Fatalf("restore job of %s: %v", req.Name, err)
	}
	if j.State != jobs.Failed || j.Error == "" {
		t.Fatalf("restore of %s should have failed: %+v", req.Name, j)
	}
	t.Logf("restore of %s failed as it should: %s", req.Name, j.Error)
	return j
}

// checkNothingLeft: a failed restore of name left no VM record, domain,
// memory server process, mount, socket or files.
func checkNothingLeft(t *testing.T, ctx context.Context, d *hostdtest.Daemon, name string) {
	t.Helper()
	if v, err := d.Client.VM(ctx, name); err == nil {
		t.Fatalf("failed restore left VM %s: %+v", name, v)
	}
	doms, err := hostdtest.Domains(name)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range doms {
		if n == name {
			t.Fatalf("failed restore left domain %s", name)
		}
	}
	dir, err := d.Config.VMDir(name)
	if err != nil {
		t.Fatal(err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), dir+"/") {
			t.Fatalf("failed restore left a process: %s: %s", p, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), " "+dir+"/") {
		t.Fatalf("failed restore left a mount under %s", dir)
	}
	for _, p := range []string{dir, filepath.Join(d.Config.RunDir, "mem", name+".sock")} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("failed restore left %s", p)
		}
	}
}

// A lazy restore whose backup is killed with SIGKILL while pages are
// still being brought: the guest waits, the event stream says the backup
// is unreachable and then back, and once a new backup process serves the
// same store the restore completes and the guest's memory is right. A
// first attempt, made while the backup is down, fails and leaves nothing;
// the retry from the same epoch succeeds.
func TestRestoreBackupKilledMidway(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := d.Client
	src := prefix + "rksrc"
	epoch, before := evacuatedSource(t, ctx, d, bk, src, 31)
	evs := watchEvents(t, ctx, c)
	name := prefix + "rk"
	// 2 MiB/s: the restore point's 60-70 MiB of non-zero pages take about
	// half a minute, so the restore is still lazy when the backup dies.
	req := protect.RestoreRequest{Backup: bk.Addr, ID: src, Name: name, Epoch: epoch, PrefetchRate: 2 << 20}

	// With the backup down the restore point cannot be read: the request
	// is refused at once (no job) with the cause's code.
	bk.Kill9()
	if j, err := c.Restore(ctx, req); err == nil {
		t.Fatalf("a restore from a dead backup was accepted: %+v", j)
	} else if ce, ok := err.(*client.Error); !ok || ce.Status != http.StatusBadGateway || ce.Code != "backup_unavailable" {
		t.Fatalf("restore from a dead backup: %v, want 502 backup_unavailable", err)
	}
	checkNothingLeft(t, ctx, d, name)
	// A restore point the backup does not hold: 404 at once.
	bk.Restart()
	missing := req
	missing.ID, missing.Name = prefix+"nosuch", prefix+"nosuch"
	if _, err := c.Restore(ctx, missing); !client.IsStatus(err, http.StatusNotFound) || !strings.Contains(err.Error(), "restore_point_not_found") {
		t.Fatalf("restore of an id the backup lacks: %v, want 404 restore_point_not_found", err)
	}
	checkNothingLeft(t, ctx, d, missing.Name)

	j, err := c.Restore(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	evs.wait(t, "vm.restored", name, 2*time.Minute)
	if j, err = c.Job(ctx, j.ID); err != nil || j.State != jobs.Running {
		t.Fatalf("the restore is not lazy any more when the backup is to die (lower the prefetch rate): %v %+v", err, j)
	}
	bk.Kill9()
	down := evs.wait(t, "restore.backup_unreachable", name, time.Minute)
	t.Logf("backup killed: %s %s", down.Type, down.Data)
	// Down for a while: the faulting guest and the prefetcher wait.
	time.Sleep(3 * time.Second)
	if j, err = c.Job(ctx, j.ID); err != nil || j.State != jobs.Running {
		t.Fatalf("the restore job ended with its backup down: %v %+v", err, j)
	}
	logRestoreStatus(t, ctx, d, name, "backup down")
	bk.Restart()
	rep := awaitReport[protect.RestoreReport](t, ctx, c, "restore across the backup's kill", j, nil)
	t.Logf("restored across the outage: epoch %d, resume %.0f ms, resident %.0f ms, %d bytes, %d remote faults (p50 %.0f us, p99 %.0f us)",
		rep.Epoch, rep.ResumeMS, rep.ResidentMS, rep.BytesFetched, rep.Faults, rep.FaultP50US, rep.FaultP99US)
	if rep.Epoch != epoch {
		t.Fatalf("restored epoch %d, asked %d", rep.Epoch, epoch)
	}
	back := evs.wait(t, "restore.backup_back", name, 10*time.Second)
	t.Logf("backup back: %s", back.Data)
	logRestoreStatus(t, ctx, d, name, "resident")
	evs.wait(t, "vm.resident", name, 10*time.Second)
	checkRestored(t, ctx, c, name, before)
}

// A bit flipped in the backup's stored image (a page of the guest's
// finished region a, which nothing reads during the test): a full restore
// detects it while copying and fails, leaving nothing behind; a lazy one
// resumes the guest, reports the page in the event stream and in the job's
// error, and the RAM file refuses it (EIO) rather than serve the flipped
// bytes, while the guest runs on. Once the image is repaired, a retry from
// the same epoch restores the guest intact.
func TestRestoreCorruptPage(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := d.Client
	src := prefix + "rcsrc"
	const seed = 33
	epoch, before := evacuatedSource(t, ctx, d, bk, src, seed)

	// The backup is stopped while the image is edited: nothing else writes
	// it then. The page is page 100 of region a, found by its content.
	bk.Stop()
	imgPath := filepath.Join(bk.StoreDir(), src, "image")
	want := make([]byte, agentapi.PageSize)
	agentapi.FillPage(want, seed, 0, 100)
	off := findPage(t, imgPath, want)
	flipBit(t, imgPath, off+1234)
	bk.Restart()
	evs := watchEvents(t, ctx, c)
	t.Logf("flipped a bit of guest page %d (offset %#x) in %s", off/agentapi.PageSize, off, imgPath)

	full := prefix + "rcf"
	j := restoreFails(t, ctx, c, protect.RestoreRequest{Backup: bk.Addr, ID: src, Name: full, Epoch: epoch, Mode: "full"})
	if !strings.Contains(j.Error, "corrupt") {
		t.Fatalf("the full restore's error does not name the corruption: %s", j.Error)
	}
	checkNothingLeft(t, ctx, d, full)

	lazy := prefix + "rcl"
	j = restoreFails(t, ctx, c, protect.RestoreRequest{Backup: bk.Addr, ID: src, Name: lazy, Epoch: epoch})
	if !strings.Contains(j.Error, fmt.Sprintf("page %d", off/agentapi.PageSize)) || !strings.Contains(j.Error, "corrupt") {
		t.Fatalf("the lazy restore's error does not name the corrupt page %d: %s", off/agentapi.PageSize, j.Error)
	}
	ev := evs.wait(t, "restore.corrupt_page", lazy, 10*time.Second)
	if !strings.Contains(string(ev.Data), fmt.Sprintf(`"page":%d`, off/agentapi.PageSize)) {
		t.Fatalf("corrupt_page event for another page: %s", ev.Data)
	}
	if n := len(evs.find("restore.corrupt_page", lazy)); n != 1 {
		t.Fatalf("%d corrupt_page events for one page", n)
	}
	v, err := c.VM(ctx, lazy)
	if err != nil || v.State != "running" {
		t.Fatalf("the lazily restored VM with a refused page: %v %+v", err, v)
	}
	// What QEMU would be handed for that page: an error, never the
	// flipped bytes. Its neighbours read right.
	checkRAMPage(t, v.Spec.RAMPath, off, nil)
	next := make([]byte, agentapi.PageSize)
	agentapi.FillPage(next, seed, 0, 101)
	checkRAMPage(t, v.Spec.RAMPath, findPage(t, imgPath, next), next)
	ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
	if err != nil {
		t.Fatalf("agent of the restored VM: %v", err)
	}
	ops0, err := ac.Ops(ctx, "c")
	time.Sleep(time.Second)
	ops1, err1 := ac.Ops(ctx, "c")
	ac.Close()
	if err != nil || err1 != nil || ops1.PagesTotal <= ops0.PagesTotal {
		t.Fatalf("the guest does not run on beside its refused page: %v %v %+v %+v", err, err1, ops0, ops1)
	}
	if err := c.DeleteVM(ctx, lazy); err != nil {
		t.Fatal(err)
	}

	// Repaired, the same epoch restores (the full restore's name again).
	bk.Stop()
	flipBit(t, imgPath, off+1234)
	bk.Restart()
	rep := restoreAndWait(t, ctx, c, protect.RestoreRequest{Backup: bk.Addr, ID: src, Name: full, Epoch: epoch, Mode: "full"})
	if rep.Epoch != epoch {
		t.Fatalf("restored epoch %d, asked %d", rep.Epoch, epoch)
	}
	checkRestored(t, ctx, c, full, before)
}

// logRestoreStatus logs the restore's own view, from the VM's memory
// server.
func logRestoreStatus(t *testing.T, ctx context.Context, d *hostdtest.Daemon, name, when string) {
	t.Helper()
	ms, err := memserver.Attach(ctx, filepath.Join(d.Config.RunDir, "mem", name+".sock"))
	if err != nil {
		t.Fatalf("memory server of %s: %v", name, err)
	}
	st, err := ms.Status(ctx)
	if err != nil || st.Restore == nil {
		t.Fatalf("memory server status of %s: %v %+v", name, err, st)
	}
	t.Logf("%s: restore status %+v", when, *st.Restore)
}

// findPage returns the offset of the page whose content is want in the
// image file at path.
func findPage(t *testing.T, path string, want []byte) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); ; off += int64(len(buf)) {
		n, err := f.ReadAt(buf, off)
		for p := 0; p+agentapi.PageSize <= n; p += agentapi.PageSize {
			if bytes.Equal(buf[p:p+agentapi.PageSize], want) {
				return off + int64(p)
			}
		}
		if err != nil {
			t.Fatalf("page not found in %s: %v", path, err)
		}
	}
}

func flipBit(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// checkRAMPage reads one page of a served RAM file with pread (the read
// QEMU's fault would make): want nil expects EIO, else that content.
func checkRAMPage(t *testing.T, ramPath string, off int64, want []byte) {
	t.Helper()
	f, err := os.Open(ramPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, agentapi.PageSize)
	_, err = f.ReadAt(got, off)
	switch {
	case want == nil && !errors.Is(err, syscall.EIO):
		t.Fatalf("RAM file page at %#x: want EIO, got %v", off, err)
	case want != nil && (err != nil || !bytes.Equal(got, want)):
		t.Fatalf("RAM file page at %#x: %v, content right: %v", off, err, bytes.Equal(got, want))
	}
}

// hostd stopped (SIGTERM) in the middle of a lazy restore: the restored
// guest is running, so the job's end must not tear it down; the next hostd
// adopts it, its memory server finishes the restore, and its memory is
// right.
func TestRestoreSurvivesHostdStop(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := d.Client
	src := prefix + "rssrc"
	epoch, before := evacuatedSource(t, ctx, d, bk, src, 35)
	evs := watchEvents(t, ctx, c)
	name := prefix + "rs"
	j, err := c.Restore(ctx, protect.RestoreRequest{Backup: bk.Addr, ID: src, Name: name, Epoch: epoch, PrefetchRate: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	evs.wait(t, "vm.restored", name, 2*time.Minute)
	if j, err = c.Job(ctx, j.ID); err != nil || j.State != jobs.Running {
		t.Fatalf("the restore is not lazy any more when hostd is to stop: %v %+v", err, j)
	}
	d.Restart()
	if j, err = c.Job(ctx, j.ID); err != nil || j.State != jobs.Failed {
		t.Fatalf("the interrupted restore job: %v %+v", err, j)
	}
	t.Logf("interrupted job: %s", j.Error)
	v, err := c.VM(ctx, name)
	if err != nil || v.State != "running" {
		t.Fatalf("the restored VM after hostd's restart: %v %+v", err, v)
	}
	ms, err := memserver.Attach(ctx, filepath.Join(d.Config.RunDir, "mem", name+".sock"))
	if err != nil {
		t.Fatalf("memory server of %s after hostd's restart: %v", name, err)
	}
	for i := 0; ; i++ {
		st, err := ms.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.FullyResident {
			t.Logf("resident after the restart: %+v", *st.Restore)
			break
		}
		if i == 1800 {
			t.Fatalf("not resident 3 minutes after hostd's restart: %+v", *st.Restore)
		}
		time.Sleep(100 * time.Millisecond)
	}
	checkRestored(t, ctx, c, name, before)
}
