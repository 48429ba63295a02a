package swapdev

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"hostd/dataplane/nbd"
	"hostd/dataplane/repo"
	"hostd/dataplane/repo/repotest"
)

// The benchmark measures once per run (go test -bench . -benchtime 1x)
// and prints `bench: NAME VALUE UNIT` lines. Both sides are the same NBD
// server and Go client over a unix socket, 4 KiB random I/O on a 64 MiB
// device filled first: the cooperative swap device with one repository
// over mutual TLS on loopback, against a swap file on the local disk
// opened O_DIRECT (a host short of memory has no page cache to spare for
// its swap), and, for reference, the same file through the page cache.

func benchLine(name string, v float64, unit string) { fmt.Printf("bench: %s %.4g %s\n", name, v, unit) }

const (
	benchSize    = 64 << 20
	benchLatOps  = 2000 // per latency figure, one request at a time
	benchTputOps = 8000 // per throughput figure
	benchDepth   = 16   // requests in flight for throughput
)

// serveBackend serves b over NBD on a unix socket and returns a client.
func serveBackend(b *testing.B, be nbd.Backend) *nbd.Client {
	sock := filepath.Join(b.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := nbd.NewServer(be, nbd.Options{})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	c, err := nbd.Dial(ctx, "unix", sock, "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(); cancel(); <-done })
	return c
}

type figures struct {
	readUs, writeUs float64 // median latency
	mbps            float64
}

// measure fills the device, then times QD1 random reads and writes and a
// QD16 random 50/50 mix.
func measure(b *testing.B, c *nbd.Client) figures {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	buf := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{7}).Read(buf)
	for off := int64(0); off < benchSize; off += int64(len(buf)) {
		if err := c.WriteAt(ctx, buf, off, false); err != nil {
			b.Fatal(err)
		}
	}
	if err := c.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(3, 4))
	page := func() int64 { return int64(r.IntN(benchSize/PageSize)) * PageSize }
	p := make([]byte, PageSize)
	median := func(op func(off int64) error) float64 {
		lat := make([]time.Duration, 0, benchLatOps)
		for range benchLatOps {
			off := page()
			t0 := time.Now()
			if err := op(off); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t0))
		}
		slices.Sort(lat)
		return float64(lat[len(lat)/2].Nanoseconds()) / 1e3
	}
	var f figures
	f.readUs = median(func(off int64) error { return c.ReadAt(ctx, p, off) })
	f.writeUs = median(func(off int64) error { return c.WriteAt(ctx, p, off, false) })

	var wg sync.WaitGroup
	t0 := time.Now()
	for g := range benchDepth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 5))
			q := make([]byte, PageSize)
			for i := range benchTputOps / benchDepth {
				off := int64(r.IntN(benchSize/PageSize)) * PageSize
				var err error
				if i%2 == 0 {
					err = c.ReadAt(ctx, q, off)
				} else {
					err = c.WriteAt(ctx, q, off, false)
				}
				if err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	f.mbps = float64(benchTputOps*PageSize) / time.Since(t0).Seconds() / 1e6
	return f
}

func BenchmarkCoopSwap(b *testing.B) {
	dir := b.TempDir()
	pkiDir := repotest.PKI(b, "hostA")
	rp := repotest.Start(b, pkiDir, repo.ServerOptions{Capacity: 2 * benchSize})
	dev, err := Open(context.Background(), Config{
		Path: filepath.Join(dir, "swap.img"), Size: benchSize, Preallocate: true,
		Repos: []RepoConfig{{Addr: rp.Addr, TLS: repotest.ClientTLS(b, pkiDir, "hostA")}},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer dev.Close()
	wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := dev.Repos()[0].WaitConnected(wctx); err != nil {
		b.Fatal(err)
	}
	coop := measure(b, serveBackend(b, dev))
	if st := dev.Stats(); st.PagesLocalOnly != 0 || st.PagesReadLocal != 0 {
		b.Fatalf("the repository did not hold every page: %d local-only, %d read locally", st.PagesLocalOnly, st.PagesReadLocal)
	}

	disk, err := OpenFile(filepath.Join(dir, "disk.img"), benchSize, true)
	if err != nil {
		b.Fatal(err)
	}
	defer disk.Close()
	base := measure(b, serveBackend(b, disk))

	cached, err := OpenFile(filepath.Join(dir, "cached.img"), benchSize, false)
	if err != nil {
		b.Fatal(err)
	}
	defer cached.Close()
	pc := measure(b, serveBackend(b, cached))

	benchLine("coopswap_read_latency_us", coop.readUs, "us")
	benchLine("disk_read_latency_us", base.readUs, "us")
	benchLine("pagecache_read_latency_us", pc.readUs, "us")
	benchLine("coopswap_read_latency_vs_disk", coop.readUs/base.readUs, "ratio")
	benchLine("coopswap_write_latency_us", coop.writeUs, "us")
	benchLine("disk_write_latency_us", base.writeUs, "us")
	benchLine("pagecache_write_latency_us", pc.writeUs, "us")
	benchLine("coopswap_write_latency_vs_disk", coop.writeUs/base.writeUs, "ratio")
	benchLine("coopswap_throughput_mbps", coop.mbps, "MB/s")
	benchLine("disk_throughput_mbps", base.mbps, "MB/s")
	benchLine("pagecache_throughput_mbps", pc.mbps, "MB/s")
	benchLine("coopswap_throughput_vs_disk", coop.mbps/base.mbps, "ratio")
}
