package swap

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"testing"
	"time"

	"hostd/dataplane/overload"
	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/hostdtest"
	"hostd/hostd/swap"
	"hostd/hostd/vm"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
)

// prefix names this bench's domains, apart from other benches' and tests'.
const prefix = "bswp-"

// measure is how long the workload's rate is sampled in each phase.
const measure = 10 * time.Second

const (
	vmMiB      = 256
	regionMiB  = 160
	balloonMiB = 112
)

// rate samples region's pages/s over measure.
func rate(ctx context.Context, ac *agentclient.Client, region string) (float64, error) {
	a, err := ac.Ops(ctx, region)
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	time.Sleep(measure)
	b, err := ac.Ops(ctx, region)
	if err != nil {
		return 0, err
	}
	return float64(b.PagesTotal-a.PagesTotal) / time.Since(t0).Seconds(), nil
}

// await returns the first overload event of kind k for name, or fails
// after limit.
func await(b *testing.B, evs <-chan client.Event, name string, k overload.Kind, limit time.Duration) overload.Event {
	b.Helper()
	deadline := time.After(limit)
	for {
		select {
		case e, ok := <-evs:
			if !ok {
				b.Fatal("event stream ended")
			}
			if e.VM == name && e.Type == string(k) {
				var oe overload.Event
				if err := json.Unmarshal(e.Data, &oe); err != nil {
					b.Fatalf("decode %s event: %v", k, err)
				}
				return oe
			}
		case <-deadline:
			b.Fatalf("no %s event for %s within %v", k, name, limit)
		}
	}
}

func BenchmarkOverloadWorkload(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root, libvirt and netns")
	}
	bin, err := hostdtest.Build(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	hostdtest.CleanupDomains(b, prefix)
	b.Cleanup(func() { hostdtest.CleanupDomains(b, prefix) })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	rh := hostdtest.StartRepo(b, bin, hostdtest.RepoOptions{CapacityMiB: 512})
	d := hostdtest.Start(b, bin, hostdtest.Options{Edit: func(c *config.Config) { rh.HostTLS(c, "host1") }})
	c := d.Client
	evs, err := c.Events(ctx)
	if err != nil {
		b.Fatal(err)
	}
	name := prefix + "ovl"
	ac := bootSwapping(b, ctx, c, rh.Addr, name)

	if _, err := ac.Dirty(ctx, agentapi.DirtyArgs{Region: "w", SizeMiB: regionMiB, Seed: 5, Swappable: true}); err != nil {
		b.Fatal(err)
	}
	// The first pass faults the region in; measure after it.
	for i := 0; ; i++ {
		st, err := ac.Ops(ctx, "w")
		if err != nil {
			b.Fatal(err)
		}
		if st.PassesDone >= 1 {
			break
		}
		if i == 600 {
			b.Fatalf("first pass not done in 5 minutes: %+v", st)
		}
		time.Sleep(500 * time.Millisecond)
	}
	provisioned, err := rate(ctx, ac, "w")
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("well provisioned (%d MiB): %.0f pages/s", vmMiB, provisioned)

	if _, err := c.SetMemory(ctx, name, balloonMiB); err != nil {
		b.Fatal(err)
	}
	started := await(b, evs, name, overload.Started, 3*time.Minute)
	b.Logf("overload started: %.0f pages/s", started.Rate)
	overloaded, err := rate(ctx, ac, "w")
	if err != nil {
		b.Fatal(err)
	}
	st, err := c.Swap(ctx, name)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("overloaded (balloon %d MiB): %.0f pages/s; device %.0f requests/s, %d pages remote, %d local only, read p-sum %.3fs/%d",
		balloonMiB, overloaded, st.Stats.OpsPerSec, st.Stats.PagesRemote, st.Stats.PagesLocalOnly, st.Stats.ReadLatency.Sum, st.Stats.ReadLatency.Count)

	if _, err := c.SetMemory(ctx, name, vmMiB); err != nil {
		b.Fatal(err)
	}
	ended := await(b, evs, name, overload.TransientEnded, 5*time.Minute)
	dur := ended.Duration
	if _, err := ac.Stop(ctx, "w"); err != nil {
		b.Fatal(err)
	}
	if _, err := ac.VerifyChecksum(ctx, "w"); err != nil {
		b.Fatalf("workload region after the overload: %v", err)
	}
	fmt.Printf("bench: overload_workload_ratio %.3f ratio\n", overloaded/provisioned)
	fmt.Printf("bench: overload_transient_s %.0f s\n", dur.Seconds())
}

// bootSwapping boots the guest, plugs its swap device and turns it on.
func bootSwapping(b *testing.B, ctx context.Context, c *client.Client, repoAddr, name string) *agentclient.Client {
	b.Helper()
	if _, err := c.CreateVM(ctx, vm.Request{Name: name, MemoryMiB: vmMiB}); err != nil {
		b.Fatal(err)
	}
	v, err := c.WaitReady(ctx, name)
	if err != nil {
		b.Fatal(err)
	}
	ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ac.Close() })
	if _, err := c.PutSwap(ctx, name, swap.Request{SizeMiB: 256, Repos: []string{repoAddr}}); err != nil {
		b.Fatal(err)
	}
	for i := 0; ; i++ {
		_, err := ac.SwapOn(ctx, swap.SerialNumber)
		if err == nil {
			return ac
		}
		if i == 60 {
			b.Fatalf("swapon: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
