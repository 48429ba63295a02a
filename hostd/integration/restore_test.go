package integration

import (
	"context"
	"fmt"
	"os/exec"
	"testing"
	"time"

	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/hostdtest"
	"hostd/hostd/protect"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
)

func restoreAndWait(t *testing.T, ctx context.Context, c *client.Client, req protect.RestoreRequest) protect.RestoreReport {
	t.Helper()
	j, err := c.Restore(ctx, req)
	return awaitReport[protect.RestoreReport](t, ctx, c, fmt.Sprintf("restore of %s as %s", req.ID, req.Name), j, err)
}

// checkRestored dials a restored guest's agent: the finished region's
// checksum is right and the running workload's counter went on from where
// it was at the evacuation.
func checkRestored(t *testing.T, ctx context.Context, c *client.Client, name string, before uint64) {
	t.Helper()
	v, err := c.VM(ctx, name)
	if err != nil || v.State != "running" {
		t.Fatalf("restored VM %s: %v %+v", name, err, v)
	}
	ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
	if err != nil {
		t.Fatalf("agent of the restored VM: %v", err)
	}
	defer ac.Close()
	if _, err := ac.VerifyChecksum(ctx, "a"); err != nil {
		t.Fatalf("restored %s: region a: %v", name, err)
	}
	var ops agentapi.WorkloadStatus
	for i := 0; i < 50; i++ {
		if ops, err = ac.Ops(ctx, "c"); err == nil && ops.PagesTotal > before {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil || ops.PagesTotal <= before {
		t.Fatalf("restored %s: the workload did not continue: %v (pages %d, were %d)", name, err, ops.PagesTotal, before)
	}
	if _, err := ac.Stop(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.VerifyChecksum(ctx, "c"); err != nil {
		t.Fatalf("restored %s: region c: %v", name, err)
	}
}

// evacuatedSource makes the restore point the restore tests restore: a
// 256 MiB served guest whose region a (24 MiB, one pass of seed) is done
// and whose workload c (8 MiB) runs, protected and evacuated with
// after=destroy. It returns the evacuation's epoch and c's page count at
// the evacuation.
func evacuatedSource(t *testing.T, ctx context.Context, d *hostdtest.Daemon, bk *hostdtest.BackupHost, name string, seed uint64) (uint64, uint64) {
	t.Helper()
	c := d.Client
	_, ac := servedVM(t, ctx, d, name, 256)
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "a", SizeMiB: 24, Seed: seed, Passes: 1}); err != nil {
		t.Fatal(err)
	}
	waitWorkload(t, ctx, ac, "a")
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "c", SizeMiB: 8, Seed: seed + 1, RateMiBs: 2}); err != nil {
		t.Fatal(err)
	}
	protectAndWait(t, ctx, c, name, protect.Request{Backup: bk.Addr})
	time.Sleep(time.Second)
	before, err := ac.Ops(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	rep := evacuate(t, ctx, c, name, protect.EvacuateRequest{After: protect.AfterDestroy})
	ac.Close()
	t.Logf("%s evacuated: epoch %d in %.0f ms", name, rep.Epoch, rep.TotalMS)
	return rep.Epoch, before.PagesTotal
}

// A VM evacuated on one host comes back lazily on the same host and, on a
// second host in its own network namespace reaching the backup over its
// own veth, lazily and in full: memory intact, workloads continuing.
func TestRestoreOnTwoHosts(t *testing.T) {
	d, bk := protectedHost(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "src"
	epoch, before := evacuatedSource(t, ctx, d, bk, name, 21)

	// Same host, new domain.
	r := restoreAndWait(t, ctx, c, protect.RestoreRequest{Backup: bk.Addr, ID: name, Name: prefix + "local"})
	t.Logf("lazy restore here: resume %.0f ms, resident %.0f ms, %d bytes fetched, %d remote faults (p50 %.0f us), phases %+v",
		r.ResumeMS, r.ResidentMS, r.BytesFetched, r.Faults, r.FaultP50US, r.Phases)
	if r.Epoch != epoch {
		t.Fatalf("restored epoch %d, evacuated %d", r.Epoch, epoch)
	}
	checkRestored(t, ctx, c, prefix+"local", before)
	if err := c.DeleteVM(ctx, prefix+"local"); err != nil {
		t.Fatal(err)
	}

	// A second host: its own namespace, state, socket, and veth to the backup.
	ns := "hdh2" + bk.Netns[4:]
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("netns: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	_ = exec.Command("ip", "-n", ns, "link", "set", "lo", "up").Run()
	bk.Link(t, ns)
	d2 := startHostd(t, hostdtest.Options{Netns: ns, Edit: func(c *config.Config) { bk.HostTLS(c, "host1") }})
	for _, mode := range []string{"lazy", "full"} {
		n := prefix + "h2" + mode
		r := restoreAndWait(t, ctx, d2.Client, protect.RestoreRequest{Backup: bk.Addr, ID: name, Name: n, Mode: mode})
		t.Logf("%s restore on host 2: resume %.0f ms, resident %.0f ms, %d bytes fetched", mode, r.ResumeMS, r.ResidentMS, r.BytesFetched)
		checkRestored(t, ctx, d2.Client, n, before)
		if err := d2.Client.DeleteVM(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
}
