package restore

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"hostd/checkpoint/memfs"
	"hostd/checkpoint/wire"
)

// step is one sweep step: a window of the map, at most a chunk of pages.
type step struct{ lo, hi int64 }

// steps cuts runs, in their order, into windows of at most chunk pages
// each; a window spans several runs when they are close (the gaps are zero
// pages, which are never fetched).
func steps(runs []wire.Run, chunk int64) []step {
	var out []step
	for _, x := range runs {
		first, end := int64(x.First), int64(x.First)+int64(x.Count)
		for first < end {
			if k := len(out); k > 0 && out[k-1].hi <= first && first < out[k-1].lo+chunk {
				// The previous window has room: extend it over the gap.
				out[k-1].hi = min(end, out[k-1].lo+chunk)
				first = out[k-1].hi
				continue
			}
			hi := min(end, first+chunk)
			out = append(out, step{first, hi})
			first = hi
		}
	}
	return out
}

// Run is the prefetcher: it brings every page not yet present, in steps of
// PrefetchChunk at PrefetchRate, most recently dirtied first, writes them
// to the cache file and has the kernel read them into fs's page cache
// (memfs.Preload, which never replaces a page the guest has). Pages the
// guest already wrote are not fetched. When every page is in the cache
// file it fsyncs it, marks the restore FullyResident, reports
// restore.resident and closes the backup connections: the VM is then
// independent of the backup. It returns nil then, ctx's error if stopped,
// or an error wrapping ErrCorrupt or ErrMoved if some pages can never be
// brought (the others are; the VM stays dependent on nothing but those
// pages, which read as EIO). With fs nil it fills the cache file only.
func (r *Restorer) Run(ctx context.Context, fs *memfs.FS) error {
	var lim *rate.Limiter
	if r.cfg.PrefetchRate > 0 {
		lim = rate.NewLimiter(rate.Limit(r.cfg.PrefetchRate), int(r.cfg.PrefetchChunk))
	}
	return r.sweep(ctx, "prefetch", byRecency(r.runs), r.cfg.PrefetchChunk/pageSize, lim, fs)
}

// Full copies every non-zero page into the cache file in image order, as
// fast as the backup serves them, before the caller mounts and starts the
// guest: the stop-and-copy baseline. Afterwards the restore is
// FullyResident and Source serves everything locally.
func (r *Restorer) Full(ctx context.Context) error {
	return r.sweep(ctx, "full", r.runs, r.cfg.FullChunk/pageSize, nil, nil)
}

func (r *Restorer) sweep(ctx context.Context, kind string, order []wire.Run, chunk int64, lim *rate.Limiter, fs *memfs.FS) error {
	op := "restore " + kind + " of " + r.cfg.ID
	t0 := time.Now()
	var wrote func(int64) bool
	if fs != nil {
		wrote = fs.HasWritten
	}
	work := steps(order, chunk)
	// Passes: a page a fault was bringing when its reader gave up is left
	// for the next pass; refused pages are not retried.
	for pass := 0; ; pass++ {
		if err := r.pass(ctx, work, lim, fs, wrote); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		r.mu.Lock()
		left, bad := r.total-r.done, int64(len(r.bad))
		var firstBad error
		for _, e := range r.bad {
			firstBad = e
			break
		}
		r.mu.Unlock()
		if left == 0 {
			break
		}
		if left == bad {
			return fmt.Errorf("%s: %d pages refused, the VM reads them as EIO (first: %w)", op, bad, firstBad)
		}
		if pass >= 100 {
			return fmt.Errorf("%s: %d pages still missing after %d passes", op, left, pass)
		}
		// Wait for faults still bringing pages, then sweep what is left.
		r.waitFlights(ctx)
		work = r.missingSteps(chunk)
	}
	if err := r.cache.Sync(); err != nil {
		return fmt.Errorf("%s: fsync cache file: %w", op, err)
	}
	r.mu.Lock()
	first := !r.resident
	if first {
		r.resident = true
		close(r.residentCh)
	}
	r.mu.Unlock()
	if first {
		r.emit(Event{Type: EventResident, Bytes: r.total * pageSize, Elapsed: time.Since(r.t0)})
		r.log.Info("fully resident; the VM no longer needs the backup", "kind", kind, "sweep", time.Since(t0))
	}
	r.fault.close()
	r.bulk.close()
	return nil
}

// pass runs the steps with PrefetchDepth workers.
func (r *Restorer) pass(ctx context.Context, work []step, lim *rate.Limiter, fs *memfs.FS, wrote func(int64) bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan step)
	var wg sync.WaitGroup
	var once sync.Once
	var ferr error
	fail := func(err error) {
		once.Do(func() { ferr = err; cancel() })
	}
	for w := 0; w < r.cfg.PrefetchDepth; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range next {
				if err := r.step(ctx, s, lim, fs, wrote); err != nil {
					fail(err)
				}
			}
		}()
	}
feed:
	for _, s := range work {
		select {
		case next <- s:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if ferr != nil {
		return ferr
	}
	return ctx.Err()
}

// step brings the missing pages of one window: flights for them (pages
// the guest wrote count as superseded), rate-limited, then preloaded.
func (r *Restorer) step(ctx context.Context, s step, lim *rate.Limiter, fs *memfs.FS, wrote func(int64) bool) error {
	if lim != nil {
		// The rate is waited for before the window's flights exist, so a
		// fault meanwhile finds its page free, not "in flight" behind the
		// limiter.
		r.mu.Lock()
		var n int64
		for pg := s.lo; pg < s.hi; pg++ {
			if r.needLocked(pg) && r.inflight[pg] == nil {
				n++
			}
		}
		r.mu.Unlock()
		if n == 0 {
			return nil
		}
		if err := lim.WaitN(ctx, int(n*pageSize)); err != nil {
			return err
		}
	}
	r.mu.Lock()
	fl := r.flightsLocked(s.lo, s.hi, s.hi-s.lo, false, func(pg int64) bool {
		if wrote != nil && wrote(pg) {
			r.supersedeLocked(pg)
			return true
		}
		return false
	})
	r.mu.Unlock()
	if len(fl) == 0 {
		return nil
	}
	errs := make(chan error, len(fl))
	for _, f := range fl {
		go func() { errs <- r.bring(ctx, r.bulk, f, true, wrote) }()
	}
	var ferr error
	for range fl {
		if err := <-errs; err != nil && !refused(err) && ferr == nil {
			ferr = err
		}
	}
	if ferr != nil {
		return ferr
	}
	if fs != nil {
		r.preload(ctx, s, fs)
	}
	return nil
}

// preload has the kernel read the window's pages that are in the cache
// file into the page cache (pages faulted around earlier reads included);
// memfs skips those the guest has already read or written. Zero pages are
// left to fault: that costs no I/O, and preloading them would fill the
// page cache with zeros.
func (r *Restorer) preload(ctx context.Context, s step, fs *memfs.FS) {
	var runs []step
	r.mu.Lock()
	for pg := s.lo; pg < s.hi; pg++ {
		if !r.present.Has(pg) {
			continue
		}
		if k := len(runs); k > 0 && runs[k-1].hi == pg {
			runs[k-1].hi++
			continue
		}
		runs = append(runs, step{pg, pg + 1})
	}
	r.mu.Unlock()
	for _, x := range runs {
		r.mu.Lock()
		r.preloads[x]++ // its READs are not the guest's faults
		r.mu.Unlock()
		res, err := fs.Preload(ctx, x.lo*pageSize, (x.hi-x.lo)*pageSize)
		r.mu.Lock()
		if r.preloads[x]--; r.preloads[x] == 0 {
			delete(r.preloads, x)
		}
		r.st.PreloadedBytes += res.Read * pageSize
		r.st.StoresSkipped += res.Skipped
		r.mu.Unlock()
		if err != nil {
			// Only a speed-up: the pages are in the cache file.
			r.log.Debug("preload failed", "err", err)
			return
		}
	}
}

// waitFlights waits for every flight in progress now.
func (r *Restorer) waitFlights(ctx context.Context) {
	r.mu.Lock()
	var fl []*flight
	for _, f := range r.inflight {
		if !slices.Contains(fl, f) {
			fl = append(fl, f)
		}
	}
	r.mu.Unlock()
	for _, f := range fl {
		select {
		case <-f.done:
		case <-ctx.Done():
			return
		}
	}
}

// missingSteps are windows over the pages still to bring.
func (r *Restorer) missingSteps(chunk int64) []step {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []step
	r.nonzero.Runs(chunk, func(first, n int64) bool {
		for pg := first; pg < first+n; pg++ {
			if !r.present.Has(pg) && !r.superseded.Has(pg) && r.bad[pg] == nil {
				out = append(out, step{first, first + n})
				break
			}
		}
		return true
	})
	return out
}
