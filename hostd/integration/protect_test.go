package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"testing"
	"time"

	"hostd/checkpoint/backupstore"
	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/hostdtest"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/hostd/vm"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
)

// protectedHost starts a backup in its own namespace and a host hostd whose
// checkpoint identity comes from the backup's PKI.
func protectedHost(t *testing.T, rateMbit int) (*hostdtest.Daemon, *hostdtest.BackupHost) {
	t.Helper()
	bk := hostdtest.StartBackup(t, binDir, hostdtest.BackupOptions{RateMbit: rateMbit})
	d := startHostd(t, hostdtest.Options{Edit: func(c *config.Config) { bk.HostTLS(c, "host1") }})
	return d, bk
}

// servedVM creates a VM on served memory and waits for its agent.
func servedVM(t *testing.T, ctx context.Context, d *hostdtest.Daemon, name string, mib uint64) (vm.VM, *agentclient.Client) {
	t.Helper()
	v, err := d.Client.CreateVM(ctx, vm.Request{Name: name, MemoryMiB: mib, ServedMemory: true})
	if err != nil {
		t.Fatalf("create served VM: %v", err)
	}
	if v, err = d.Client.WaitReady(ctx, name); err != nil {
		t.Fatalf("wait ready: %v", err)
	}
	ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	t.Cleanup(func() { ac.Close() })
	return v, ac
}

// waitWorkload polls the agent until region's finite workload is done.
func waitWorkload(t *testing.T, ctx context.Context, ac *agentclient.Client, region string) {
	t.Helper()
	for i := 0; i < 1200; i++ {
		st, err := ac.Ops(ctx, region)
		if err != nil {
			t.Fatalf("ops %s: %v", region, err)
		}
		if !st.Running {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("workload %s still running after 2 minutes", region)
}

func protectAndWait(t *testing.T, ctx context.Context, c *client.Client, name string, req protect.Request) protect.Status {
	t.Helper()
	j, err := c.Protect(ctx, name, req)
	if err != nil {
		t.Fatalf("protect: %v", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if j, err = c.WaitJob(wctx, j.ID); err != nil || j.State != jobs.Succeeded {
		t.Fatalf("first copy job: %v %+v", err, j)
	}
	st, err := c.Protection(ctx, name)
	if err != nil {
		t.Fatalf("get protection: %v", err)
	}
	return st
}

func evacuate(t *testing.T, ctx context.Context, c *client.Client, name string, req protect.EvacuateRequest) protect.Report {
	t.Helper()
	j, err := c.Evacuate(ctx, name, req)
	return awaitReport[protect.Report](t, ctx, c, "evacuation", j, err)
}

// awaitReport waits for a job (as its start returned it) to succeed and
// decodes its report.
func awaitReport[T any](t *testing.T, ctx context.Context, c *client.Client, what string, j jobs.Job, err error) T {
	t.Helper()
	if err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	if j, err = c.WaitJob(ctx, j.ID); err != nil || j.State != jobs.Succeeded {
		t.Fatalf("%s job: %v %+v", what, err, j)
	}
	var rep T
	if err := remarshal(j.Report, &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

// compareWithBackup reads the committed image of id from the (stopped)
// backup's store and compares it page by page with the RAM file.
func compareWithBackup(t *testing.T, bk *hostdtest.BackupHost, id, ramPath string, size int64) {
	t.Helper()
	st, err := backupstore.Open(bk.StoreDir(), backupstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	img, err := st.VM(id, size, false)
	if err != nil {
		t.Fatalf("backup has no image of %s: %v", id, err)
	}
	f, err := os.Open(ramPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const chunk = 1 << 20
	a, b := make([]byte, chunk), make([]byte, chunk)
	diff := 0
	for off := int64(0); off < size; off += chunk {
		if _, err := f.ReadAt(a, off); err != nil {
			t.Fatalf("read RAM file at %d: %v", off, err)
		}
		if _, err := img.ReadAt(b, off); err != nil {
			t.Fatalf("read backup image at %d: %v", off, err)
		}
		for p := 0; p < chunk; p += 4096 {
			if !bytes.Equal(a[p:p+4096], b[p:p+4096]) {
				if diff < 5 {
					t.Errorf("page at %#x differs between the RAM file and the backup", off+int64(p))
				}
				diff++
			}
		}
	}
	if diff > 0 {
		t.Fatalf("%d of %d pages differ", diff, size/4096)
	}
}

// A protected VM is evacuated: the report holds its phases and the bound,
// the backup's image equals guest memory at the pause page for page, and
// the resumed guest's checksums are right.
func TestProtectAndEvacuate(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "prot"
	v, ac := servedVM(t, ctx, d, name, 256)

	// Written before protection: the first copy must carry it.
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "a", SizeMiB: 24, Seed: 7, Passes: 2}); err != nil {
		t.Fatal(err)
	}
	waitWorkload(t, ctx, ac, "a")
	st := protectAndWait(t, ctx, c, name, protect.Request{Backup: bk.Addr, Bound: &config.Duration{Duration: 5 * time.Second}})
	t.Logf("protected: state %s copy %d bytes cap %d bandwidth %.1f MB/s headroom %.0f ms",
		st.State, st.CopyTotal, st.CapBytes, st.BandwidthBps/1e6, st.HeadroomMS)
	if st.State != "protected" || st.CapBytes <= 0 || st.Backup != bk.Addr {
		t.Fatalf("protection after the first copy: %+v", st)
	}

	// Dirtying while protected, then evacuate.
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "b", SizeMiB: 32, Seed: 9, RateMiBs: 8}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	rep := evacuate(t, ctx, c, name, protect.EvacuateRequest{})
	t.Logf("evacuation: total %.0f ms of %.0f ms bound (held %v), pause %.0f ms, epoch %d, phases %+v",
		rep.TotalMS, rep.BoundMS, rep.BoundHeld, rep.PauseMS, rep.Epoch, rep.Phases)
	if rep.Epoch == 0 || len(rep.Phases) < 4 || rep.After != protect.AfterPause {
		t.Fatalf("evacuation report: %+v", rep)
	}
	if v2, _ := c.VM(ctx, name); v2.State != "paused" {
		t.Fatalf("after an evacuation the VM must stay paused, is %s", v2.State)
	}

	// The backup's committed image is guest memory at the pause.
	bk.Stop()
	compareWithBackup(t, bk, name, v.Spec.RAMPath, 256<<20)

	// The guest runs on with correct memory.
	if _, err := hostdtest.Virsh("resume", name); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"a", "b"} {
		if _, err := ac.VerifyChecksum(ctx, r); err != nil {
			t.Fatalf("region %s after evacuation and resume: %v", r, err)
		}
	}
	if err := c.DeleteVM(ctx, name); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if _, err := os.Stat(v.Spec.RAMPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("RAM file after delete: %v", err)
	}
}

// Bad protection requests get clear 4xx errors and change nothing.
func TestProtectionBadInputs(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := d.Client
	plain := prefix + "plain"
	if _, err := c.CreateVM(ctx, vm.Request{Name: plain, MemoryMiB: 64, Start: ptr(false)}); err != nil {
		t.Fatal(err)
	}
	// Served memory, never started: nothing to protect yet (409 not_running).
	off := prefix + "offp"
	if _, err := c.CreateVM(ctx, vm.Request{Name: off, MemoryMiB: 64, Start: ptr(false), ServedMemory: true}); err != nil {
		t.Fatal(err)
	}
	name := prefix + "badp"
	servedVM(t, ctx, d, name, 128)
	good := protect.Request{Backup: bk.Addr, Bound: &config.Duration{Duration: 5 * time.Second}}
	cases := []struct {
		what string
		vm   string
		req  protect.Request
		code int
	}{
		{"unknown VM", prefix + "nosuch", good, http.StatusNotFound},
		{"plain memory", plain, good, http.StatusBadRequest},
		{"never started", off, good, http.StatusConflict},
		{"zero bound", name, protect.Request{Backup: bk.Addr, Bound: &config.Duration{}}, http.StatusBadRequest},
		{"backup port out of range", name, protect.Request{Backup: bk.HostIP + ":99999"}, http.StatusBadRequest},
		{"no backup", name, protect.Request{}, http.StatusBadRequest},
		{"backup not host:port", name, protect.Request{Backup: "nowhere"}, http.StatusBadRequest},
		{"negative bound", name, protect.Request{Backup: bk.Addr, Bound: &config.Duration{Duration: -time.Second}}, http.StatusBadRequest},
		{"epoch interval too short", name, protect.Request{Backup: bk.Addr, EpochInterval: config.Duration{Duration: time.Millisecond}}, http.StatusBadRequest},
		{"dead backup", name, protect.Request{Backup: bk.HostIP + ":9"}, http.StatusBadGateway},
	}
	for _, tc := range cases {
		_, err := c.Protect(ctx, tc.vm, tc.req)
		if !client.IsStatus(err, tc.code) {
			t.Errorf("%s: want HTTP %d, got %v", tc.what, tc.code, err)
		} else {
			t.Logf("%s: %v", tc.what, err)
		}
	}
	// Nothing was protected by any of them.
	if l, err := c.ListProtection(ctx); err != nil || len(l) != 0 {
		t.Fatalf("protections after bad requests: %v %+v", err, l)
	}
	if _, err := c.Evacuate(ctx, name, protect.EvacuateRequest{}); !client.IsStatus(err, http.StatusConflict) {
		t.Errorf("evacuate unprotected: want 409, got %v", err)
	}
	protectAndWait(t, ctx, c, name, good)
	if _, err := c.Protect(ctx, name, good); !client.IsStatus(err, http.StatusConflict) {
		t.Errorf("protect twice: want 409, got %v", err)
	}
	if _, err := c.Evacuate(ctx, name, protect.EvacuateRequest{After: "explode"}); !client.IsStatus(err, http.StatusBadRequest) {
		t.Errorf("evacuate after=explode: want 400, got %v", err)
	}
	if _, err := c.Evacuate(ctx, name, protect.EvacuateRequest{Deadline: time.Now().Add(-time.Second)}); !client.IsStatus(err, http.StatusBadRequest) {
		t.Errorf("evacuate with a past deadline: want 400, got %v", err)
	}
	if err := c.Unprotect(ctx, name); err != nil {
		t.Fatalf("unprotect: %v", err)
	}
	if _, err := c.Protection(ctx, name); !client.IsStatus(err, http.StatusConflict) {
		t.Errorf("protection after unprotect: want 409, got %v", err)
	}
}

// remarshal turns a job's report (decoded as generic JSON) into its type.
func remarshal(in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, out)
}

// fakeEC2 serves IMDSv2 on loopback: a token, then 404 for the
// instance-action until notice() is called, then the action.
type fakeEC2 struct {
	mu     sync.Mutex
	action string
}

func (f *fakeEC2) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
		_, _ = w.Write([]byte("tok"))
	case r.URL.Path == "/latest/meta-data/spot/instance-action" && r.Header.Get("X-aws-ec2-metadata-token") == "tok":
		f.mu.Lock()
		a := f.action
		f.mu.Unlock()
		if a == "" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(a))
	default:
		w.WriteHeader(http.StatusUnauthorized)
	}
}

// A spot termination notice (EC2's IMDSv2, served on loopback) evacuates
// every protected VM before the notice's deadline, and the notice and the
// evacuation are on the event stream.
func TestTerminationNoticeEvacuates(t *testing.T) {
	fake := &fakeEC2{}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	bk := hostdtest.StartBackup(t, binDir, hostdtest.BackupOptions{})
	d := startHostd(t, hostdtest.Options{Edit: func(c *config.Config) {
		bk.HostTLS(c, "host1")
		c.Notice.EC2 = config.Watcher{Enabled: true, BaseURL: srv.URL, Interval: config.Duration{Duration: 100 * time.Millisecond}}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "spot"
	servedVM(t, ctx, d, name, 128)
	protectAndWait(t, ctx, c, name, protect.Request{Backup: bk.Addr})
	evs, err := c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute).UTC().Truncate(time.Second)
	fake.mu.Lock()
	fake.action = `{"action": "terminate", "time": "` + deadline.Format(time.RFC3339) + `"}`
	fake.mu.Unlock()

	var sawNotice bool
	for e := range evs {
		switch e.Type {
		case "host.termination_notice":
			sawNotice = true
			t.Logf("notice event: %s", e.Data)
		case "vm.evacuated":
			if !sawNotice || e.VM != name {
				t.Fatalf("evacuation without a notice first: %+v", e)
			}
			var rep protect.Report
			if err := remarshal(e.Data, &rep); err != nil {
				t.Fatal(err)
			}
			t.Logf("evacuated on notice: epoch %d, total %.0f ms, bound %.0f ms", rep.Epoch, rep.TotalMS, rep.BoundMS)
			if !rep.BoundHeld || rep.Epoch == 0 || rep.BoundMS < 60000 {
				t.Fatalf("evacuation on notice: %+v", rep)
			}
			return
		}
	}
	t.Fatal("event stream ended before the evacuation")
}

// waitProtection polls GET protection until ok says so (bounded).
func waitProtection(t *testing.T, ctx context.Context, c *client.Client, name, what string, ok func(protect.Status) bool) protect.Status {
	t.Helper()
	var st protect.Status
	var err error
	for i := 0; i < 600; i++ {
		st, err = c.Protection(ctx, name)
		if err == nil && ok(st) {
			return st
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("protection of %s never became %s: %v %+v", name, what, err, st)
	return st
}

// The backup killed while a guest streams: the guest runs on, protection
// says degraded, and once the backup is back it reconnects, resynchronises
// and an evacuation leaves the backup equal to guest memory. Then hostd
// itself is killed with SIGKILL while the guest dirties memory: the guest
// and its checkpointing run on without it, and the restarted hostd finds
// the protection where it was.
func TestProtectionSurvivesKills(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "kills"
	v, ac := servedVM(t, ctx, d, name, 256)
	protectAndWait(t, ctx, c, name, protect.Request{Backup: bk.Addr, Bound: &config.Duration{Duration: 5 * time.Second}})
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "w", SizeMiB: 48, Seed: 11, RateMiBs: 16}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)

	// Backup killed mid-stream.
	bk.Kill9()
	st := waitProtection(t, ctx, c, name, "degraded", func(s protect.Status) bool { return s.State == "degraded" })
	t.Logf("backup down: %s (%s)", st.State, st.Reason)
	ops0, err := ac.Ops(ctx, "w")
	if err != nil {
		t.Fatalf("guest with its backup down: %v", err)
	}
	time.Sleep(time.Second)
	if ops1, err := ac.Ops(ctx, "w"); err != nil || ops1.PagesTotal <= ops0.PagesTotal {
		t.Fatalf("the guest stopped dirtying while its backup was down: %v %+v %+v", err, ops0, ops1)
	}
	bk.Restart()
	st = waitProtection(t, ctx, c, name, "protected again", func(s protect.Status) bool { return s.State == "protected" && s.Reconnects > 0 })
	t.Logf("backup back: %s after %d reconnects, acked epoch %d", st.State, st.Reconnects, st.AckedEpoch)

	// hostd killed mid-flush.
	acked := st.AckedEpoch
	d.Kill9()
	time.Sleep(3 * time.Second)
	if _, err := ac.Ops(ctx, "w"); err != nil {
		t.Fatalf("guest after hostd was killed: %v", err)
	}
	d.Restart()
	st = waitProtection(t, ctx, c, name, "protected after the hostd restart", func(s protect.Status) bool {
		return s.State == "protected" && s.AckedEpoch > acked
	})
	t.Logf("after kill -9 of hostd: %s, acked epoch %d (was %d)", st.State, st.AckedEpoch, acked)

	if _, err := ac.Stop(ctx, "w"); err != nil {
		t.Fatal(err)
	}
	rep := evacuate(t, ctx, c, name, protect.EvacuateRequest{})
	t.Logf("evacuation after the kills: total %.0f ms, epoch %d", rep.TotalMS, rep.Epoch)
	bk.Stop()
	compareWithBackup(t, bk, name, v.Spec.RAMPath, 256<<20)
	if _, err := hostdtest.Virsh("resume", name); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.VerifyChecksum(ctx, "w"); err != nil {
		t.Fatalf("guest memory after the kills: %v", err)
	}
}

// Crash-consistent epochs: with an epoch interval, restore points come at
// that pace, each a short reported pause, and nothing is committed in
// between (a revocation without warning falls back to the last one).
func TestCrashConsistentEpochs(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "epochs"
	_, ac := servedVM(t, ctx, d, name, 128)
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "w", SizeMiB: 16, Seed: 3, RateMiBs: 4}); err != nil {
		t.Fatal(err)
	}
	protectAndWait(t, ctx, c, name, protect.Request{Backup: bk.Addr, EpochInterval: config.Duration{Duration: 2 * time.Second}})
	first, err := c.Protection(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	st := waitProtection(t, ctx, c, name, "two restore points further", func(s protect.Status) bool {
		return s.RestorableEpoch >= first.AckedEpoch+2 && s.LastEpochPauseMS > 0
	})
	t.Logf("epochs: restorable %d, acked %d, last pause %.0f ms", st.RestorableEpoch, st.AckedEpoch, st.LastEpochPauseMS)
	if st.AckedEpoch != st.RestorableEpoch {
		t.Fatalf("a non-restorable epoch was committed between restore points: acked %d, restorable %d", st.AckedEpoch, st.RestorableEpoch)
	}
	if v, _ := c.VM(ctx, name); v.State != "running" {
		t.Fatalf("after epochs the VM is %s", v.State)
	}
	if _, err := ac.Stop(ctx, "w"); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.VerifyChecksum(ctx, "w"); err != nil {
		t.Fatal(err)
	}
}

// The bound under a throttled link: the backup behind a 80 Mbit/s tbf on
// the veth, a guest dirtying at 0, 0.5x, 1x and 4x the link is evacuated
// under T = 4 s each time. The achieved times are reported (the bench,
// hostd/bench/protect, asserts them against T).
func TestEvacuationBoundThrottled(t *testing.T) {
	const mbit = 80
	d, bk := protectedHost(t, mbit)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "bound"
	_, ac := servedVM(t, ctx, d, name, 256)
	const bound = 4 * time.Second
	protectAndWait(t, ctx, c, name, protect.Request{Backup: bk.Addr, Bound: &config.Duration{Duration: bound}})
	link := float64(mbit) * 1e6 / 8 / (1 << 20)
	for i, x := range []float64{0, 0.5, 1, 4} {
		region := string(rune('p' + i))
		if x > 0 {
			if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: region, SizeMiB: 32, Seed: uint64(i), RateMiBs: max(uint64(x*link), 1)}); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(4 * time.Second)
		st, _ := c.Protection(ctx, name)
		rep := evacuate(t, ctx, c, name, protect.EvacuateRequest{Deadline: time.Now().Add(bound), After: protect.AfterResume})
		t.Logf("dirty %.1fx the link: evacuated in %.0f ms of %.0f (achieved/T %.2f, held %v), pause %.0f ms, unflushed %.1f MiB of cap %.1f MiB at %.1f MB/s",
			x, rep.TotalMS, rep.BoundMS, rep.TotalMS/rep.BoundMS, rep.BoundHeld, rep.PauseMS, float64(rep.UnflushedBytes)/(1<<20), float64(st.CapBytes)/(1<<20), st.BandwidthBps/1e6)
		if x > 0 {
			if _, err := ac.Stop(ctx, region); err != nil {
				t.Fatal(err)
			}
			if _, err := ac.VerifyChecksum(ctx, region); err != nil {
				t.Fatalf("after the evacuation at %.1fx: %v", x, err)
			}
		}
	}
	// The drills resumed the guest: their notices are withdrawn and the
	// protection is healthy under its own bound again.
	time.Sleep(5 * time.Second) // past the last drill's deadline
	if st, err := c.Protection(ctx, name); err != nil || st.Notice || st.State != "protected" {
		t.Fatalf("after the drills: %v %+v", err, st)
	}
}
