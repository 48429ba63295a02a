package bench

import (
	"context"
	"crypto/rand"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
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

// BenchmarkRestore: a 256 MiB image, every page written, checkpointed
// through memfs -> TLS -> backup store on local disk, then restored over
// mutual TLS on loopback:
//
//   - restore_backup_rtt_us: a plain round trip to the same backup
//     (Ping/Pong through its restore session, no disk), the baseline;
//   - fault_p50_us / fault_p99_us: a guest process's remote faults (1000
//     pages in distinct 256 KiB windows) as the restore's Source serves
//     them, the mount's read-ahead at one page (memfs.Options.ReadAhead,
//     what a restore mount should use); _around64k also fetches the rest
//     of the aligned 64 KiB around each fault in the background;
//     _readaround128k leaves the kernel's default 128 KiB read-around, so
//     each fault waits for 128 KiB; _prefetching32m while the prefetcher
//     sweeps at 32 MiB/s (faults must not wait for its chunks);
//   - residency_over_full_copy: time from Open to fully resident with the
//     prefetcher (unlimited rate, preloading the page cache) over time
//     from Open to the end of a full copy, same image, backup page cache
//     dropped before each, best of two each, alternating.
func BenchmarkRestore(b *testing.B) {
	needRoot(b)
	const size = 256 << 20
	dir := b.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	pkiDir := filepath.Join(dir, "pki")
	if err := pki.Generate(pkiDir, pki.Spec{ServerNames: []string{"127.0.0.1"}, Hosts: []string{"host1"}}); err != nil {
		b.Fatal(err)
	}
	storeDir := filepath.Join(dir, "store")
	st, err := backupstore.Open(storeDir, backupstore.Options{Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	stc, _ := pki.DirServerConfig(pkiDir)
	srv, err := backup.New(st, stc, backup.Options{Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	sctx, scancel := context.WithCancel(ctx)
	served := make(chan struct{})
	go func() { defer close(served); srv.Serve(sctx, ln) }()
	defer func() { scancel(); <-served }()
	addr := ln.Addr().String()
	ctc, _ := pki.DirClientConfig(pkiDir, "host1", "127.0.0.1")

	// The restore point: a guest fills every page, the pause flushes it,
	// device state and a restorable commit.
	s, err := backupclient.Open(ctx, backupclient.Config{Addr: addr, TLS: ctc, VMID: "bench", ImageSize: size, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	src, err := memfs.Mount(ctx, b.TempDir(), memfs.Options{Size: size, Sink: s, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	runWriter(b, memfstest.Spec{Path: src.Path(), Size: size, Mode: "fill", Passes: 1, NoSync: true})
	if err := src.Sync(ctx); err != nil {
		b.Fatal(err)
	}
	state := make([]byte, 300<<10)
	rand.Read(state)
	if err := s.SendDeviceState(ctx, state); err != nil {
		b.Fatal(err)
	}
	if _, err := s.Commit(ctx, true); err != nil {
		b.Fatal(err)
	}
	src.Unmount()
	s.Close()
	v, err := st.VM("bench", 0, false)
	if err != nil {
		b.Fatal(err)
	}
	if err := v.Sync(ctx); err != nil {
		b.Fatal(err)
	}
	dropImage := func() {
		f, err := os.Open(filepath.Join(storeDir, "bench", "image"))
		if err != nil {
			b.Fatal(err)
		}
		unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		f.Close()
	}

	// Baseline: round trips through the backup's restore session.
	rc, err := backupclient.DialRestore(ctx, backupclient.RestoreConfig{Addr: addr, TLS: ctc, VMID: "bench", ImageSize: size, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	var rtts []time.Duration
	for i := 0; i < 2000; i++ {
		d, err := rc.Ping(ctx)
		if err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, d)
	}
	rc.Close()
	slices.Sort(rtts)
	rtt := rtts[len(rtts)/2]
	report("restore_backup_rtt_us", us(rtt), "us")

	cfg := func(name string) restore.Config {
		return restore.Config{Backup: addr, TLS: ctc, ID: "bench", Size: size, CacheFile: filepath.Join(dir, name), Logger: quiet()}
	}
	mount := func(r *restore.Restorer, readAhead int) *memfs.FS {
		fs, err := memfs.Mount(ctx, b.TempDir(), memfs.Options{Size: size, Sink: discard{}, Source: r.Source(), ReadAhead: readAhead, Logger: quiet()})
		if err != nil {
			b.Fatal(err)
		}
		return fs
	}

	// Faults.
	var pages []int64
	for p := int64(0); p < size/4096; p += size / 4096 / 1000 {
		pages = append(pages, p)
	}
	for _, c := range []struct {
		suffix     string
		readAhead  int
		faultChunk int64
		prefetch   float64 // the prefetcher sweeps at this rate meanwhile
	}{{"", 4096, 0, 0}, {"_around64k", 4096, 64 << 10, 0}, {"_readaround128k", 128 << 10, 0, 0}, {"_prefetching32m", 4096, 0, 32 << 20}} {
		t0 := time.Now()
		fc := cfg("cache-faults")
		fc.FaultChunk, fc.PrefetchRate = c.faultChunk, c.prefetch
		r, err := restore.Open(ctx, fc)
		if err != nil {
			b.Fatal(err)
		}
		open := time.Since(t0)
		fs := mount(r, c.readAhead)
		pctx, pcancel := context.WithCancel(ctx)
		swept := make(chan struct{})
		if c.prefetch > 0 {
			// The guest's faults meet the sweep's 4 MiB chunks in flight
			// (the first ones waiting for their turn at the rate).
			go func() { defer close(swept); r.Run(pctx, fs) }()
		} else {
			close(swept)
		}
		runWriter(b, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "hash", Pages: pages, NoSync: true})
		pcancel()
		<-swept
		rs := r.Status()
		fs.Unmount()
		r.Close()
		os.Remove(cfg("cache-faults").CacheFile)
		report("fault_p50_us"+c.suffix, us(rs.FaultP50), "us")
		report("fault_p99_us"+c.suffix, us(rs.FaultP99), "us")
		report("fault_p50_over_rtt"+c.suffix, rs.FaultP50.Seconds()/rtt.Seconds(), "ratio")
		report("fault_bytes_per_fault"+c.suffix, float64(rs.FetchedBytes-rs.PrefetchedBytes)/float64(max(1, rs.RemoteFaults)), "B")
		if c.suffix == "" {
			report("restore_open_ms", open.Seconds()*1000, "ms")
		}
	}

	// Residency with prefetch against a full copy.
	best := func(cur, d time.Duration) time.Duration {
		if cur == 0 || d < cur {
			return d
		}
		return cur
	}
	var tFull, tLazy, tNoPreload time.Duration
	for i := 0; i < 2; i++ {
		dropImage()
		t0 := time.Now()
		r, err := restore.Open(ctx, cfg("cache-full"))
		if err != nil {
			b.Fatal(err)
		}
		if err := r.Full(ctx); err != nil {
			b.Fatal(err)
		}
		tFull = best(tFull, time.Since(t0))
		r.Close()
		os.Remove(cfg("cache-full").CacheFile)

		dropImage()
		t0 = time.Now()
		r, err = restore.Open(ctx, cfg("cache-lazy"))
		if err != nil {
			b.Fatal(err)
		}
		fs := mount(r, 128<<10)
		if err := r.Run(ctx, fs); err != nil {
			b.Fatal(err)
		}
		tLazy = best(tLazy, time.Since(t0))
		fs.Unmount()
		r.Close()
		os.Remove(cfg("cache-lazy").CacheFile)

		// The same sweep without pushing pages into the page cache.
		dropImage()
		t0 = time.Now()
		r, err = restore.Open(ctx, cfg("cache-lazy"))
		if err != nil {
			b.Fatal(err)
		}
		if err := r.Run(ctx, nil); err != nil {
			b.Fatal(err)
		}
		tNoPreload = best(tNoPreload, time.Since(t0))
		r.Close()
		os.Remove(cfg("cache-lazy").CacheFile)
	}
	report("prefetch_residency_ms_256m_nopreload", tNoPreload.Seconds()*1000, "ms")
	report("full_copy_ms_256m", tFull.Seconds()*1000, "ms")
	report("full_copy_mbps", size/tFull.Seconds()/1e6, "MB/s")
	report("prefetch_residency_ms_256m", tLazy.Seconds()*1000, "ms")
	report("residency_over_full_copy", tLazy.Seconds()/tFull.Seconds(), "ratio")

	// Two full restores at once: each should get about half.
	dropImage()
	var wg sync.WaitGroup
	durs := make([]time.Duration, 2)
	for i := range durs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			c := cfg("cache-fair-" + string(rune('a'+i)))
			r, err := restore.Open(ctx, c)
			if err != nil {
				b.Error(err)
				return
			}
			if err := r.Full(ctx); err != nil {
				b.Error(err)
			}
			durs[i] = time.Since(t0)
			r.Close()
			os.Remove(c.CacheFile)
		}()
	}
	wg.Wait()
	report("concurrent_full_copy_fairness", min(durs[0], durs[1]).Seconds()/max(durs[0], durs[1]).Seconds(), "ratio")
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
