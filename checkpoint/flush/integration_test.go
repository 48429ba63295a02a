package flush_test

import (
	"context"
	"hostd/checkpoint/bdi"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"hostd/checkpoint/flush"
	"hostd/checkpoint/memfs"
	"hostd/checkpoint/memfs/memfstest"
)

func TestMain(m *testing.M) {
	memfstest.Main()
	os.Exit(m.Run())
}

// TestWriterHeldUnderCap: a separate process dirties a 64 MiB memfs file
// three times over as fast as it can, against a sink limited to 50 MB/s.
// The controller derives the cap from the measured rate; the mount's
// unflushed memory (bdi dirty + writeback + memfs queue) stays under it,
// and the final fsync's time is reported against the prediction.
func TestWriterHeldUnderCap(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	const size = 64 << 20
	if err := bdi.MountDebugfs(); err != nil {
		t.Log(err)
	}
	const queue = 4 << 20
	out, err := os.Create(filepath.Join(t.TempDir(), "sink"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	sink := &memfstest.RateSink{Rate: 50e6, F: out}
	fs, err := memfs.Mount(context.Background(), t.TempDir(), memfs.Options{
		Size: size, Sink: sink, QueueBytes: queue, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Unmount()
	p := flush.Params{
		Bound: time.Second, Pause: 10 * time.Millisecond, State: 20 * time.Millisecond, Commit: 20 * time.Millisecond,
		Safety: 0.8, MinCap: queue + 2<<20, MaxCap: size,
	}
	// Start from a pessimistic guess; the measured rate takes over.
	ctl, err := flush.NewController(p, fs, 20e6)
	if err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var peak, peakCap int64
	var samples int
	var violations int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 100000; i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if i%100 == 99 {
				if bw := sink.Measured(); bw > 0 {
					ctl.ObserveBandwidth(time.Now(), bw)
				}
			}
			d, ok := fs.BDI().Unflushed()
			if !ok {
				return
			}
			st := fs.Stats()
			u := d + st.BytesWritten - st.BytesDelivered
			c := ctl.State(time.Now(), u).Cap
			samples++
			if u > peak {
				peak, peakCap = u, c
			}
			// The kernel's accounting is batched per CPU: a few MiB of
			// slack over the limit is its documented imprecision.
			if u > c+4<<20 {
				violations++
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := memfstest.Run(ctx, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "passes", Passes: 3, Lock: true, BDI: fs.BDI().Name})
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if samples == 0 {
		t.Skip("debugfs bdi stats not available")
	}
	st := ctl.State(time.Now(), 0)
	dirtyAtPause := res.UnflushedAtSync + queue // queue is full while throttled
	predicted := p.Evacuation(dirtyAtPause, sink.Measured()) - p.Pause - p.State - p.Commit
	t.Logf("sink %.1f MB/s, cap %.1f MiB; writer dirtied %d MiB in %v (%.1f MB/s)",
		sink.Measured()/1e6, float64(st.Cap)/(1<<20), res.Bytes>>20, res.Dirty, float64(res.Bytes)/res.Dirty.Seconds()/1e6)
	t.Logf("peak unflushed %.1f MiB (cap then %.1f MiB) over %d samples; at fsync %.1f MiB + queue",
		float64(peak)/(1<<20), float64(peakCap)/(1<<20), samples, float64(res.UnflushedAtSync)/(1<<20))
	t.Logf("final fsync %v, predicted flush %v (ratio %.2f)", res.Fsync, predicted, res.Fsync.Seconds()/predicted.Seconds())
	if violations > 0 {
		t.Fatalf("unflushed memory exceeded the cap in %d of %d samples (peak %d, cap %d)", violations, samples, peak, peakCap)
	}
	if got := fs.Stats(); got.BytesDelivered != got.BytesWritten || got.Unaligned != 0 {
		t.Fatalf("after fsync: %+v", got)
	}
}
