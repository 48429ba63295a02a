package restore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"hostd/checkpoint/memfs"
	"hostd/checkpoint/wire"
)

// flight is a fetch of pages [first, first+n) in progress. A reader that
// needs one of its pages waits for it if it is another fault's (a page or
// a few on the fault link); if it is a sweep's chunk (or the chunk around
// another fault), which can take many times as long and may still be
// waiting for its turn, the reader fetches its pages itself.
type flight struct {
	first, n int64
	fault    bool // on the fault link, for a reader that waits for it
	done     chan struct{}
}

// source adapts a Restorer to memfs.Source.
type source struct{ r *Restorer }

// ReadPages serves a memfs READ: zero pages locally, present pages from
// the cache file, the rest fetched from the backup (the aligned chunk
// around them following in the background, if configured), verified and
// written to the cache file first.
func (s source) ReadPages(ctx context.Context, off int64, p []byte) error {
	return s.r.readPages(ctx, off, p)
}

func (r *Restorer) readPages(ctx context.Context, off int64, p []byte) error {
	op := fmt.Sprintf("restore read %d bytes at %d", len(p), off)
	if off < 0 || off%pageSize != 0 || len(p)%pageSize != 0 || off+int64(len(p)) > r.cfg.Size {
		return fmt.Errorf("%s: unaligned or outside the image", op)
	}
	t0 := time.Now()
	first, n := off/pageSize, int64(len(p))/pageSize
	remote := false
	for {
		mine, waits, around, err := r.plan(first, n)
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		for _, f := range around {
			go func() {
				defer r.bg.Done()
				r.bring(r.ctx, r.bulk, f, false, nil)
			}()
		}
		if len(mine) == 0 && len(waits) == 0 {
			break
		}
		remote = true
		errs := make(chan error, len(mine))
		for i, f := range mine {
			if i == len(mine)-1 {
				errs <- r.bring(ctx, r.fault, f, false, nil) // the usual single flight: no goroutine
				break
			}
			go func() { errs <- r.bring(ctx, r.fault, f, false, nil) }()
		}
		var ferr error
		for range mine {
			// A refused page outside this read's range is no reason to
			// fail it; one inside shows up when planning again.
			if err := <-errs; err != nil && !refused(err) && ferr == nil {
				ferr = err
			}
		}
		if ferr != nil {
			return fmt.Errorf("%s: %w", op, ferr)
		}
		for _, f := range waits {
			select {
			case <-f.done:
			case <-ctx.Done():
				return fmt.Errorf("%s: %w", op, ctx.Err())
			}
		}
		// Flights we waited for may have failed (their reader gave up):
		// plan again; pages they brought are present now.
	}
	// Every page is present or zero, and the cache file is sparse: one
	// read gives both.
	if _, err := r.cache.ReadAt(p, off); err != nil {
		return fmt.Errorf("%s: cache file: %w", op, err)
	}
	r.mu.Lock()
	for x := range r.preloads {
		if x.lo <= first && first+n <= x.hi {
			r.mu.Unlock()
			return nil
		}
	}
	r.st.Faults++
	if remote {
		r.st.RemoteFaults++
		r.sampleLocked(time.Since(t0))
	}
	r.mu.Unlock()
	return nil
}

// plan looks at pages [first, first+n): it returns flights this reader
// must run for its missing pages, flights of others to wait for, and
// flights for the rest of the aligned fault chunk around them (which the
// reader starts but does not wait for: the guest's neighbouring pages are
// likely next, but only its own pages delay it), or the error of a
// refused page.
func (r *Restorer) plan(first, n int64) (mine, waits, around []*flight, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[*flight]bool{}
	lo, hi := int64(-1), int64(-1)
	for pg := first; pg < first+n; pg++ {
		if !r.nonzero.Has(pg) || r.present.Has(pg) {
			continue
		}
		if e := r.bad[pg]; e != nil {
			return nil, nil, nil, e
		}
		if f := r.inflight[pg]; f != nil && f.fault {
			if !seen[f] {
				seen[f] = true
				waits = append(waits, f)
			}
			continue
		}
		if lo < 0 {
			lo = pg
		}
		hi = pg + 1
	}
	if lo < 0 {
		return nil, waits, nil, nil
	}
	// Pages a sweep's chunk is bringing are fetched again here: one round
	// trip on the fault link instead of the chunk's transfer (and its wait
	// behind the other chunks in flight). Whichever copy lands first makes
	// the page present; both are the same verified bytes.
	mine = r.flightsLocked(lo, hi, wire.MaxData/pageSize, true, nil)
	chunk := r.cfg.FaultChunk / pageSize
	clo, chi := lo/chunk*chunk, min((hi+chunk-1)/chunk*chunk, r.cfg.Size/pageSize)
	if !r.closed {
		around = append(r.flightsLocked(clo, lo, chunk, false, nil), r.flightsLocked(hi, chi, chunk, false, nil)...)
		r.bg.Add(len(around)) // under mu: Close waits for them
	}
	return mine, waits, around, nil
}

// flightsLocked registers flights for the pages of [lo, hi) that must be
// brought and nobody is bringing: contiguous runs of at most maxPages.
// Fault flights also take pages only sweep (non-fault) flights are
// bringing: later readers of those pages wait for the fault's flight; the
// sweep's copy, when it lands, changes nothing (see bring). skip, if set,
// vetoes pages (the prefetcher's check against memfs).
func (r *Restorer) flightsLocked(lo, hi, maxPages int64, fault bool, skip func(pg int64) bool) []*flight {
	var out []*flight
	var cur *flight
	for pg := lo; pg < hi; pg++ {
		f := r.inflight[pg]
		need := r.needLocked(pg) && (f == nil || fault && !f.fault)
		if need && skip != nil && skip(pg) {
			need = false
		}
		if !need {
			cur = nil
			continue
		}
		if cur == nil || cur.n == maxPages {
			cur = &flight{first: pg, fault: fault, done: make(chan struct{})}
			out = append(out, cur)
		}
		cur.n++
		r.inflight[pg] = cur
	}
	return out
}

// bring fetches a flight's pages over l, checks each against its stored
// sum and epoch, writes the good ones to the cache file and marks them
// present, and refuses the others for good. wrote, if set, tells a page
// the guest wrote since (a newer copy at the backup is then its own).
func (r *Restorer) bring(ctx context.Context, l *link, f *flight, sequential bool, wrote func(pg int64) bool) (err error) {
	var refused []Event
	var brought int64
	defer func() {
		r.mu.Lock()
		for pg := f.first; pg < f.first+f.n; pg++ {
			if r.inflight[pg] == f {
				delete(r.inflight, pg)
			}
		}
		r.st.FetchedBytes += brought * pageSize
		if sequential {
			r.st.PrefetchedBytes += brought * pageSize
		}
		close(f.done)
		r.mu.Unlock()
		for _, e := range refused {
			r.emit(e)
		}
	}()
	buf := make([]byte, f.n*pageSize)
	sums := make([]wire.PageSum, f.n)
	if err := r.fetch(ctx, l, f.first*pageSize, buf, sums, sequential); err != nil {
		return err
	}
	brought = f.n
	good := make([]bool, f.n)
	var firstErr error
	for i := range sums {
		pg := f.first + int64(i)
		page := buf[int64(i)*pageSize : int64(i+1)*pageSize]
		var perr error
		var typ string
		switch {
		case wire.Checksum(page) != sums[i].CRC:
			perr = fmt.Errorf("page %d (offset %d): crc %08x, the backup stored %08x: %w", pg, pg*pageSize, wire.Checksum(page), sums[i].CRC, ErrCorrupt)
			typ = EventCorrupt
		case sums[i].Epoch > r.epoch:
			if wrote != nil && wrote(pg) {
				// The restored guest's own write, committed by its own
				// protection: memfs pins the page; nothing to bring.
				r.mu.Lock()
				r.supersedeLocked(pg)
				r.mu.Unlock()
				continue
			}
			perr = fmt.Errorf("page %d: last written in epoch %d, after restore point %d: %w", pg, sums[i].Epoch, r.epoch, ErrMoved)
			typ = EventMoved
		default:
			good[i] = true
			continue
		}
		if firstErr == nil {
			firstErr = perr
		}
		// A fault and a sweep may both have fetched the page: refuse and
		// report it once.
		r.mu.Lock()
		if r.bad[pg] == nil && !r.present.Has(pg) {
			r.bad[pg] = perr
			r.st.CorruptPages++
			refused = append(refused, Event{Type: typ, Page: pg, Error: perr.Error()})
		}
		r.mu.Unlock()
	}
	// Pages another flight made present meanwhile (a fault took them from
	// this sweep's chunk, or the other way round) are not written again:
	// the cache file already holds the same verified bytes, and a page
	// may be superseded by the guest's own write since.
	r.mu.Lock()
	for i := range good {
		if pg := f.first + int64(i); good[i] && (r.present.Has(pg) || r.superseded.Has(pg)) {
			good[i] = false
		}
	}
	r.mu.Unlock()
	// Write runs of good pages, then mark them: a page is present only
	// once the cache file holds it.
	for i := int64(0); i < f.n; {
		if !good[i] {
			i++
			continue
		}
		j := i
		for j < f.n && good[j] {
			j++
		}
		if _, err := r.cache.WriteAt(buf[i*pageSize:j*pageSize], (f.first+i)*pageSize); err != nil {
			return fmt.Errorf("write cache file: %w", err)
		}
		r.mu.Lock()
		for pg := f.first + i; pg < f.first+j; pg++ {
			if !r.present.Has(pg) && !r.superseded.Has(pg) {
				r.present.AddRange(pg, 1)
				r.done++
			}
		}
		r.mu.Unlock()
		i = j
	}
	return firstErr
}

// needLocked: page pg must still be brought (in flight or not).
func (r *Restorer) needLocked(pg int64) bool {
	return r.nonzero.Has(pg) && !r.present.Has(pg) && !r.superseded.Has(pg) && r.bad[pg] == nil
}

func (r *Restorer) supersedeLocked(pg int64) {
	if !r.present.Has(pg) && !r.superseded.Has(pg) {
		r.superseded.AddRange(pg, 1)
		r.done++
		r.st.StoresSkipped++
	}
}

// refused reports whether err is a page the restore will never serve.
func refused(err error) bool { return errors.Is(err, ErrCorrupt) || errors.Is(err, ErrMoved) }

var _ memfs.Source = source{}
