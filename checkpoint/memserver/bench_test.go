package memserver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"hostd/checkpoint/memfs/memfstest"
	"hostd/checkpoint/memserver"
)

// BenchmarkMemserver measures, in one run, a guest (the memfstest writer)
// dirtying its RAM through an unprotected memory server and through a
// protected one (TLS to a backup on loopback, same machine), and the
// Sync + Commit of a small dirty set, the memory server's part of an
// evacuation's pause.
func BenchmarkMemserver(b *testing.B) {
	needRoot(b)
	const size = 64 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	e := newBackup(b)
	plain := spawn(b, testConfig(b, "bench-plain", size))
	prot := spawn(b, testConfig(b, "bench-prot", size))
	if err := prot.c.Protect(ctx, e.protection(30*time.Second)); err != nil {
		b.Fatal(err)
	}
	prot.waitState(b, memserver.StateProtected, 20*time.Second)

	// Writer throughput: three passes over the file, store + final fsync.
	// Alternate the two servers and keep each one's best, on 2 noisy cores.
	writer := func(v *vm) float64 {
		res, err := memfstest.Run(ctx, memfstest.Spec{Path: filepath.Join(v.cfg.Dir, "ram"), Size: size, Mode: "passes", Passes: 3})
		if err != nil {
			b.Fatal(err)
		}
		return float64(res.Bytes) / (res.Dirty + res.Fsync).Seconds()
	}
	var bestPlain, bestProt float64
	for round := 0; round < 3; round++ {
		bestPlain = max(bestPlain, writer(plain))
		bestProt = max(bestProt, writer(prot))
	}
	b.Logf("writer: unprotected %.1f MB/s, protected %.1f MB/s", bestPlain/1e6, bestProt/1e6)

	// Sync + Commit after a small dirty set (a few hundred pages).
	state := make([]byte, 300<<10) // the size of a small guest's device state
	var ms []float64
	for i := 0; i < 7; i++ {
		if _, err := memfstest.Run(ctx, memfstest.Spec{Path: filepath.Join(prot.cfg.Dir, "ram"), Size: size, Mode: "scribble", Seed: uint64(10 + i), Count: 300, NoSync: true}); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		sr, err := prot.c.Sync(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := prot.c.Commit(ctx, state); err != nil {
			b.Fatal(err)
		}
		ms = append(ms, float64(time.Since(t0).Microseconds())/1000)
		b.Logf("sync of %d unflushed bytes + commit: %.1f ms", sr.Bytes, ms[len(ms)-1])
	}
	sort.Float64s(ms)
	fmt.Printf("bench: memserver_commit_ms %.1f ms\n", ms[len(ms)/2])
	fmt.Printf("bench: protected_writer_over_unprotected %.3f ratio\n", bestProt/bestPlain)
	b.ReportMetric(ms[len(ms)/2], "commit_ms")
	b.ReportMetric(bestProt/bestPlain, "protected_ratio")
}
