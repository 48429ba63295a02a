package integration

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/hostdtest"
	"hostd/hostd/protect"
	"hostd/hostd/swap"
	"hostd/hostd/vm"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
)

// swapHost starts a repository in its own namespace and a host hostd whose
// swap identity comes from the repository's PKI, sampling every second.
func swapHost(t *testing.T) (*hostdtest.Daemon, *hostdtest.RepoHost) {
	t.Helper()
	rh := hostdtest.StartRepo(t, binDir, hostdtest.RepoOptions{CapacityMiB: 256})
	d := startHostd(t, hostdtest.Options{Edit: func(c *config.Config) {
		rh.HostTLS(c, "host1")
		c.Swap.SampleInterval = config.Duration{Duration: time.Second}
	}})
	return d, rh
}

// swappingVM boots a 256 MiB VM, gives it a swap device on the repository
// and turns it on in the guest.
func swappingVM(t *testing.T, ctx context.Context, d *hostdtest.Daemon, rh *hostdtest.RepoHost, name string) *agentclient.Client {
	t.Helper()
	if _, err := d.Client.CreateVM(ctx, vmRequest(name, 256)); err != nil {
		t.Fatalf("create VM: %v", err)
	}
	v, err := d.Client.WaitReady(ctx, name)
	if err != nil {
		t.Fatalf("wait ready: %v", err)
	}
	ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	t.Cleanup(func() { ac.Close() })
	st, err := d.Client.PutSwap(ctx, name, swap.Request{SizeMiB: 256, Repos: []string{rh.Addr}})
	if err != nil {
		t.Fatalf("put swap: %v", err)
	}
	if st.Serial != swap.SerialNumber || st.Stats.Size != 256<<20 {
		t.Fatalf("swap status %+v", st.Record)
	}
	// The hot-plugged disk shows up in the guest after its ACPI event.
	var res agentapi.SwapResult
	for i := 0; ; i++ {
		if res, err = ac.SwapOn(ctx, swap.SerialNumber); err == nil || i == 60 {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("swapon in the guest: %v", err)
	}
	if res.SwapTotalKiB < 200<<10 {
		t.Fatalf("guest swap after swapon: %+v", res)
	}
	t.Logf("guest swaps on %s (%d KiB)", res.Device, res.SwapTotalKiB)
	return ac
}

// pressure starts a swappable workload larger than the balloon target and
// shrinks the VM under it, then waits until the guest has really paged
// pages out to the device, and in again.
func pressure(t *testing.T, ctx context.Context, d *hostdtest.Daemon, ac *agentclient.Client, name, region string, sizeMiB, seed uint64) {
	t.Helper()
	before, err := d.Client.Swap(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: region, SizeMiB: sizeMiB, Seed: seed, Swappable: true}); err != nil {
		t.Fatalf("dirty: %v", err)
	}
	if _, err := d.Client.SetMemory(ctx, name, 112); err != nil {
		t.Fatalf("balloon: %v", err)
	}
	for i := 0; ; i++ {
		st, err := d.Client.Swap(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		// 16 MiB written out and read back: the workload's passes go
		// through swap.
		if st.Stats.WriteBytes-before.Stats.WriteBytes > 16<<20 && st.Stats.ReadBytes-before.Stats.ReadBytes > 16<<20 {
			t.Logf("swap: %d MiB written, %d MiB read, %d pages remote, %d local only, %.0f ops/s",
				st.Stats.WriteBytes>>20, st.Stats.ReadBytes>>20, st.Stats.PagesRemote, st.Stats.PagesLocalOnly, st.Stats.OpsPerSec)
			return
		}
		if i == 600 {
			t.Fatalf("the guest did not page through the device in 5 minutes: %+v", st.Stats)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// stopAndVerify stops the workload and checks the region's checksum: every
// page that went to swap came back intact.
func stopAndVerify(t *testing.T, ctx context.Context, ac *agentclient.Client, region string) {
	t.Helper()
	if _, err := ac.Stop(ctx, region); err != nil {
		t.Fatalf("stop: %v", err)
	}
	got, err := ac.VerifyChecksum(ctx, region)
	if err != nil {
		t.Fatalf("checksum after swapping: %v", err)
	}
	t.Logf("checksum ok after %d passes + %d pages", got.PassesDone, got.PageInPass)
}

// A guest swaps to its cooperative swap device while ballooned down under a
// workload; its pages live in the repository (in another namespace, over
// mutual TLS) and come back with the right checksum; the paging rate makes
// overload events.
func TestSwapGuestBallooned(t *testing.T) {
	d, rh := swapHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	evs, err := d.Client.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	name := prefix + "swap"
	ac := swappingVM(t, ctx, d, rh, name)
	pressure(t, ctx, d, ac, name, "ws", 160, 7)
	stopAndVerify(t, ctx, ac, "ws")

	st, err := d.Client.Swap(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if st.Stats.PagesReadRemote == 0 || len(st.Stats.Repos) != 1 || !st.Stats.Repos[0].Connected {
		t.Errorf("pages should have come back from the repository: %+v", st.Stats)
	}
	if st.Stats.ReadLatency.Count == 0 || st.Stats.WriteLatency.Count == 0 {
		t.Errorf("latency histograms empty: %+v %+v", st.Stats.ReadLatency, st.Stats.WriteLatency)
	}
	rs, err := rh.Client.Repo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.Clients) != 1 || rs.Clients[0].Name != "host1" || rs.Clients[0].Used == 0 {
		t.Errorf("repository status: %+v", rs)
	}
	// The guest paged far above 200 operations/s for seconds: the policy
	// saw an overload start.
	seen := false
	deadline := time.After(30 * time.Second)
	for !seen {
		select {
		case e, ok := <-evs:
			if !ok {
				t.Fatal("event stream ended")
			}
			seen = e.Type == "overload_started" && e.VM == name
		case <-deadline:
			t.Fatalf("no overload_started event; swap status %+v", st.Overload)
		}
	}
	if err := d.Client.Do(ctx, http.MethodGet, "/metrics", nil, nil); err != nil {
		t.Fatal(err)
	}
}

// The repository is killed (SIGKILL) while the guest swaps: reads fall back
// to the local copy and the checksum is right; restarted (empty), the
// repository takes pages again and the checksum is still right.
func TestSwapRepoKilled(t *testing.T) {
	d, rh := swapHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	name := prefix + "swapkill"
	ac := swappingVM(t, ctx, d, rh, name)
	pressure(t, ctx, d, ac, name, "ws", 160, 11)
	before, err := d.Client.Swap(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	rh.Kill9()
	stopAndVerify(t, ctx, ac, "ws")
	after, err := d.Client.Swap(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if after.Stats.PagesReadLocal <= before.Stats.PagesReadLocal {
		t.Errorf("no page was read from the local copy after the repository died: before %+v after %+v", before.Stats, after.Stats)
	}

	rh.Revive()
	for i := 0; ; i++ {
		st, err := d.Client.Swap(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if st.Stats.Repos[0].Connected {
			break
		}
		if i == 120 {
			t.Fatalf("device did not reconnect to the restarted repository: %+v", st.Stats.Repos)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// The first region stays allocated (half of it in swap): a second
	// one of 96 MiB keeps the guest paging.
	pressure(t, ctx, d, ac, name, "ws2", 96, 12)
	stopAndVerify(t, ctx, ac, "ws2")
	if _, err := ac.VerifyChecksum(ctx, "ws"); err != nil {
		t.Errorf("first region after the restart: %v", err)
	}
	rs, err := rh.Client.Repo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rs.Used == 0 {
		t.Errorf("the restarted repository holds no pages: %+v", rs)
	}
}

// Bad swap and memory requests through the socket: each a clear 4xx, and
// none leaves a device behind.
func TestSwapBadInputs(t *testing.T) {
	d, rh := swapHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := d.Client
	name := prefix + "swapbad"
	if _, err := c.CreateVM(ctx, vmRequest(name, 128)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitReady(ctx, name); err != nil {
		t.Fatal(err)
	}
	good := swap.Request{SizeMiB: 64, Repos: []string{rh.Addr}}
	cases := []struct {
		what   string
		vm     string
		req    any
		status int
		words  string
	}{
		{"unknown VM", prefix + "ghost", good, 404, "no such VM"},
		{"size 0", name, swap.Request{Repos: good.Repos}, 400, "size_mib"},
		{"absurd size", name, swap.Request{SizeMiB: 1 << 40, Repos: good.Repos}, 400, "max_size_mib"},
		{"no repos", name, swap.Request{SizeMiB: 64}, 400, "repos is empty"},
		{"bad repo address", name, swap.Request{SizeMiB: 64, Repos: []string{"not-an-address"}}, 400, "host:port"},
		{"repo twice", name, swap.Request{SizeMiB: 64, Repos: []string{rh.Addr, rh.Addr}}, 400, "twice"},
		{"unknown field", name, strings.NewReader(`{"size_mib": 64, "repos": ["` + rh.Addr + `"], "sise": 1}`), 400, "unknown field"},
		{"malformed", name, strings.NewReader(`{"size_mib": `), 400, "malformed"},
	}
	for _, tc := range cases {
		err := c.Do(ctx, http.MethodPut, "/v1/vms/"+tc.vm+"/swap", tc.req, nil)
		var ce *client.Error
		if !asClientErr(err, &ce) || ce.Status != tc.status || !strings.Contains(ce.Message, tc.words) {
			t.Errorf("%s: got %v, want HTTP %d mentioning %q", tc.what, err, tc.status, tc.words)
		}
	}
	if l, err := c.ListSwap(ctx); err != nil || len(l) != 0 {
		t.Fatalf("devices after bad requests: %v %+v", err, l)
	}
	if _, err := c.PutSwap(ctx, name, good); err != nil {
		t.Fatalf("good request: %v", err)
	}
	if _, err := c.PutSwap(ctx, name, good); !client.IsStatus(err, 409) {
		t.Errorf("swap twice: %v, want 409", err)
	}
	// Swapped-out pages would not move with an evacuation: a VM with a
	// swap device cannot be protected.
	if _, err := c.Protect(ctx, name, protect.Request{Backup: "127.0.0.1:1"}); !client.IsStatus(err, 409) || !strings.Contains(err.Error(), "swap") {
		t.Errorf("protect a VM with swap: %v, want 409 naming its swap", err)
	}
	if err := c.DeleteSwap(ctx, prefix+"ghost"); !client.IsStatus(err, 404) {
		t.Errorf("delete swap of unknown VM: %v, want 404", err)
	}
	for _, tc := range []struct {
		vm     string
		mib    uint64
		status int
	}{{prefix + "ghost", 64, 404}, {name, 1, 400}, {name, 1 << 20, 400}} {
		if _, err := c.SetMemory(ctx, tc.vm, tc.mib); !client.IsStatus(err, tc.status) {
			t.Errorf("memory %s %d MiB: %v, want %d", tc.vm, tc.mib, err, tc.status)
		}
	}
	// The guest never turned the swap on: unplugging is safe.
	if err := c.DeleteSwap(ctx, name); err != nil {
		t.Fatalf("delete swap: %v", err)
	}
	if _, err := c.Swap(ctx, name); !client.IsStatus(err, 404) {
		t.Errorf("swap after delete: %v, want 404", err)
	}
}

func vmRequest(name string, mib uint64) vm.Request { return vm.Request{Name: name, MemoryMiB: mib} }

// hostd restarts under a VM whose guest turned its swap off (what a disk
// plugged without the NBD reconnect delay needs, see hostd/swap's doc): the
// new hostd serves the device again (QEMU reconnects to its socket), the
// guest formats and swaps on it again, and its pages are intact.
func TestSwapSurvivesHostdRestart(t *testing.T) {
	d, rh := swapHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	name := prefix + "swaprst"
	ac := swappingVM(t, ctx, d, rh, name)
	pressure(t, ctx, d, ac, name, "ws", 160, 21)
	if _, err := ac.Stop(ctx, "ws"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Client.SetMemory(ctx, name, 256); err != nil {
		t.Fatal(err)
	}
	var err error
	for i := 0; ; i++ { // swapoff needs the balloon to have let go
		if _, err = ac.SwapOff(ctx, swap.SerialNumber); err == nil || i == 60 {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		t.Fatalf("swapoff: %v", err)
	}
	d.Restart()
	st, err := d.Client.Swap(ctx, name)
	if err != nil {
		t.Fatalf("swap after the restart: %v", err)
	}
	if st.Stats.PagesLocalOnly != st.Stats.Size/4096 {
		t.Errorf("a resumed device reads every page from its file: %+v", st.Stats)
	}
	// Without the reconnect delay (a disk plugged through libvirt 9.0)
	// QEMU notices the lost server at the next request, which fails while
	// it reconnects (seen: mkswap's first write); later ones succeed.
	for i := 0; ; i++ {
		if _, err = ac.SwapOn(ctx, swap.SerialNumber); err == nil {
			break
		}
		t.Logf("swapon after the restart, attempt %d: %v", i+1, err)
		if i == 4 {
			t.Fatalf("swapon after the restart: %v", err)
		}
		time.Sleep(time.Second)
	}
	pressure(t, ctx, d, ac, name, "ws2", 96, 22)
	stopAndVerify(t, ctx, ac, "ws2")
	if _, err := ac.VerifyChecksum(ctx, "ws"); err != nil {
		t.Errorf("first region: %v", err)
	}
}

// hostd restarts while the guest swaps through its device: QEMU holds the
// disk's requests for the NBD reconnect delay (the device is plugged with
// blockdev-add, which takes it), the new hostd serves the device again
// from its local file, and every page comes back intact.
func TestSwapThroughHostdRestart(t *testing.T) {
	d, rh := swapHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	name := prefix + "swapthru"
	ac := swappingVM(t, ctx, d, rh, name)
	st, err := d.Client.Swap(ctx, name)
	if err != nil || st.Plugged != "monitor" {
		t.Fatalf("plugged %q (%v), want monitor: only blockdev-add carries the reconnect delay", st.Plugged, err)
	}
	pressure(t, ctx, d, ac, name, "ws", 160, 31)
	d.Restart() // the workload goes on paging meanwhile
	pressure(t, ctx, d, ac, name, "ws2", 64, 32)
	stopAndVerify(t, ctx, ac, "ws")
	stopAndVerify(t, ctx, ac, "ws2")
}
