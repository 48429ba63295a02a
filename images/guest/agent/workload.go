package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"hostd/images/guest/agentapi"
)

// chunkPages is how many pages the writer fills per lock hold: small enough
// that checksum and stop wait at most a few milliseconds under TCG, large
// enough that locking costs nothing next to filling.
const chunkPages = 16

// workload is one dirty region and its writer goroutine.
type workload struct {
	args  agentapi.DirtyArgs
	pages uint64
	mem   []byte // mmapped, mlocked unless Swappable: the pattern must stay in guest RAM

	// mu is held by the writer while it fills a chunk and by checksum
	// while it hashes, so a hash always matches (passesDone, pageInPass).
	mu         sync.Mutex
	passesDone uint64
	pageInPass uint64

	total   atomic.Uint64 // pages written, ever
	rate    atomic.Uint64 // float64 bits: pages/s over the last sample
	running atomic.Bool

	cancel context.CancelFunc
	done   chan struct{}
}

func (a *agent) startDirty(args agentapi.DirtyArgs) (agentapi.WorkloadStatus, error) {
	mi, err := readMemInfo()
	if err != nil {
		return agentapi.WorkloadStatus{}, fmt.Errorf("dirty %s: %w", args.Region, err)
	}
	// Leave headroom so the agent and kernel keep working while the
	// region is locked.
	const headroomKiB = 24 * 1024
	avail, where := mi["MemAvailable"], "available"
	if args.Swappable {
		avail, where = avail+mi["SwapFree"], "available in RAM and swap"
	}
	if args.SizeMiB*1024+headroomKiB > avail {
		return agentapi.WorkloadStatus{}, fmt.Errorf("dirty %s: size_mib %d does not fit: %d KiB %s, %d KiB kept free",
			args.Region, args.SizeMiB, avail, where, headroomKiB)
	}

	a.mu.Lock()
	defer a.mu.Unlock()
	if old, ok := a.workloads[args.Region]; ok {
		if old.running.Load() {
			return agentapi.WorkloadStatus{}, fmt.Errorf("dirty %s: region is busy; stop it first", args.Region)
		}
		// A stopped region of the same name is replaced: that is how a
		// test frees one.
		old.release()
		delete(a.workloads, args.Region)
	}
	size := int(args.SizeMiB << 20)
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return agentapi.WorkloadStatus{}, fmt.Errorf("dirty %s: mmap %d MiB: %w", args.Region, args.SizeMiB, err)
	}
	if args.Swappable {
		// Swap one page at a time, as a guest under memory pressure does
		// (huge pages would be split anyway).
		_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	} else if err := unix.Mlock(mem); err != nil {
		_ = unix.Munmap(mem)
		return agentapi.WorkloadStatus{}, fmt.Errorf("dirty %s: mlock %d MiB: %w", args.Region, args.SizeMiB, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &workload{
		args:   args,
		pages:  args.SizeMiB * agentapi.PagesPerMiB,
		mem:    mem,
		cancel: cancel,
		done:   make(chan struct{}),
	}
	w.running.Store(true)
	a.workloads[args.Region] = w
	go w.run(ctx)
	return w.status(), nil
}

func (a *agent) lookup(cmd, region string) (*workload, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	w, ok := a.workloads[region]
	if !ok {
		return nil, fmt.Errorf("%s %s: no such region", cmd, region)
	}
	return w, nil
}

// stopDirty stops the writer after its current chunk and keeps the memory,
// so the region can still be checksummed.
func (a *agent) stopDirty(region string) (agentapi.WorkloadStatus, error) {
	w, err := a.lookup(agentapi.CmdStop, region)
	if err != nil {
		return agentapi.WorkloadStatus{}, err
	}
	w.cancel()
	<-w.done
	return w.status(), nil
}

func (a *agent) ops(region string) (agentapi.WorkloadStatus, error) {
	w, err := a.lookup(agentapi.CmdOps, region)
	if err != nil {
		return agentapi.WorkloadStatus{}, err
	}
	return w.status(), nil
}

func (a *agent) checksum(region string) (agentapi.ChecksumResult, error) {
	w, err := a.lookup(agentapi.CmdChecksum, region)
	if err != nil {
		return agentapi.ChecksumResult{}, err
	}
	w.mu.Lock()
	if w.mem == nil {
		w.mu.Unlock()
		return agentapi.ChecksumResult{}, fmt.Errorf("checksum %s: region was replaced", region)
	}
	sum := sha256.Sum256(w.mem)
	p, k := w.passesDone, w.pageInPass
	w.mu.Unlock()
	return agentapi.ChecksumResult{
		Region:     region,
		SHA256:     hex.EncodeToString(sum[:]),
		SizeMiB:    w.args.SizeMiB,
		Seed:       w.args.Seed,
		PassesDone: p,
		PageInPass: k,
		Running:    w.running.Load(),
	}, nil
}

func (w *workload) status() agentapi.WorkloadStatus {
	w.mu.Lock()
	p, k := w.passesDone, w.pageInPass
	w.mu.Unlock()
	return agentapi.WorkloadStatus{
		Region:      w.args.Region,
		SizeMiB:     w.args.SizeMiB,
		Pages:       w.pages,
		Seed:        w.args.Seed,
		RateMiBs:    w.args.RateMiBs,
		Passes:      w.args.Passes,
		Running:     w.running.Load(),
		PassesDone:  p,
		PageInPass:  k,
		PagesTotal:  w.total.Load(),
		PagesPerSec: math.Float64frombits(w.rate.Load()),
	}
}

// release unmaps the region; holding mu keeps a concurrent checksum from
// reading unmapped memory.
func (w *workload) release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	_ = unix.Munlock(w.mem)
	_ = unix.Munmap(w.mem)
	w.mem = nil
}

// run writes passes until done or cancelled.
func (w *workload) run(ctx context.Context) {
	defer close(w.done)
	defer w.running.Store(false)
	p := pacer{pagesPerSec: float64(w.args.RateMiBs * agentapi.PagesPerMiB), start: time.Now()}
	for pass := uint64(0); w.args.Passes == 0 || pass < w.args.Passes; pass++ {
		for i := uint64(0); i < w.pages; i += chunkPages {
			if ctx.Err() != nil {
				return
			}
			end := min(i+chunkPages, w.pages)
			w.mu.Lock()
			for j := i; j < end; j++ {
				agentapi.FillPage(w.mem[j*agentapi.PageSize:(j+1)*agentapi.PageSize], w.args.Seed, pass, j)
			}
			w.pageInPass = end
			if end == w.pages {
				w.passesDone, w.pageInPass = pass+1, 0
			}
			w.mu.Unlock()
			w.total.Add(end - i)
			if err := p.wait(ctx, end-i); err != nil {
				return
			}
		}
	}
}

// pacer holds a writer to a rate. It keeps a running budget from a start
// time; if the writer falls far behind (the VM was paused, checkpointed
// and restored, or the guest was starved) it forgives the debt instead of
// bursting to catch up.
type pacer struct {
	pagesPerSec float64 // 0: unpaced
	start       time.Time
	written     float64
}

func (p *pacer) wait(ctx context.Context, pages uint64) error {
	if p.pagesPerSec == 0 {
		return nil
	}
	p.written += float64(pages)
	due := p.start.Add(time.Duration(p.written / p.pagesPerSec * float64(time.Second)))
	now := time.Now()
	if now.Sub(due) > time.Second {
		p.start, p.written = now, 0
		return nil
	}
	if d := due.Sub(now); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// sampleRates updates each workload's pages/s once a second.
func (a *agent) sampleRates(ctx context.Context) {
	type sample struct {
		at    time.Time
		total uint64
	}
	last := map[*workload]sample{}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			a.mu.Lock()
			seen := map[*workload]sample{}
			for _, w := range a.workloads {
				s := sample{at: now, total: w.total.Load()}
				if prev, ok := last[w]; ok {
					if dt := s.at.Sub(prev.at).Seconds(); dt > 0 {
						w.rate.Store(math.Float64bits(float64(s.total-prev.total) / dt))
					}
				}
				seen[w] = s
			}
			a.mu.Unlock()
			last = seen
		}
	}
}
