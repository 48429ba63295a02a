package memserver

import (
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/memfs"
	"hostd/checkpoint/pageset"
)

// sink is the memfs Sink for the whole life of the mount. memfs cannot
// change its sink, and protection comes and goes, so this one switches:
// while unprotected it discards (memfs pins every written page itself, so
// nothing is lost, only not backed up), while protected it forwards to the
// protection's stream through the rate limiter.
//
// mu is held across every delivery. The first copy must not let an older
// copy of a page overwrite a newer writeback, yet it must not hold mu while
// it reads the RAM file: the read can wait for the writeback of that very
// page, whose FUSE WRITE waits for queue space, which only a delivery
// (which needs mu) frees. So the copy opens a watch, reads without mu, and
// under mu sends only the pages no delivery touched meanwhile; a touched
// page was written back after the watch opened and either carries data at
// least as new as the read, or is dirty again and will be delivered again.
type sink struct {
	mu     sync.Mutex
	watch  *pageset.Set         // pages delivered since the first copy's watch opened (nil: none open)
	stream *backupclient.Stream // nil: discard
	ctx    context.Context      // the protection's: ends waits and sends at Unprotect
	broken func()               // tells the protection its stream failed

	lim *rate.Limiter // unlimited (rate.Inf) unless a share is set
	// down: the stream is broken. Sends then only record the pages as
	// owed, so they skip the limiter: the guest runs on at full speed
	// while the backup is away, and Reconnect resends.
	down atomic.Bool

	statMu sync.Mutex
	bytes  int64         // forwarded since the last take
	busy   time.Duration // time spent forwarding (limiter waits included)
	since  time.Time     // last take
}

const minBurst = 1 << 20

func newSink() *sink {
	return &sink{lim: rate.NewLimiter(rate.Inf, burstFor(0)), since: time.Now()}
}

// burstFor sizes the limiter's bucket: large enough for one FUSE write
// (1 MiB) in a single wait, small enough that a new rate bites within a
// fraction of a second.
func burstFor(bytesPerSec float64) int {
	const lo, hi = minBurst, 4 << 20
	b := bytesPerSec / 4
	switch {
	case !(b > lo):
		return lo
	case b > hi:
		return hi
	}
	return int(b)
}

// setRate changes the share live; 0 is unlimited.
func (s *sink) setRate(bytesPerSec float64) {
	if bytesPerSec <= 0 || math.IsInf(bytesPerSec, 1) {
		s.lim.SetLimit(rate.Inf)
		s.lim.SetBurst(burstFor(0))
		return
	}
	s.lim.SetBurst(burstFor(bytesPerSec))
	s.lim.SetLimit(rate.Limit(bytesPerSec))
}

// attach starts forwarding to stream. ctx bounds every wait and send.
func (s *sink) attach(ctx context.Context, stream *backupclient.Stream, broken func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stream, s.ctx, s.broken = stream, ctx, broken
	s.down.Store(false)
}

// up says the stream works again (after a Reconnect).
func (s *sink) up() { s.down.Store(false) }

// detach goes back to discarding. Cancel the attach context first, or a
// delivery waiting on a slow link or a small rate holds mu for long.
func (s *sink) detach() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stream, s.ctx, s.broken = nil, nil, nil
}

// WritePages forwards memfs writeback to the stream. A broken or closed
// stream is not memfs's problem: SendPages records the pages as owed
// before it fails, Reconnect resends them from the RAM file, and an error
// here would only make memfs's next barrier (the final Sync) fail on a
// link that has since been repaired.
func (s *sink) WritePages(_ context.Context, off int64, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stream == nil {
		return nil
	}
	if s.watch != nil {
		first := off / memfs.PageSize
		s.watch.AddRange(first, (off+int64(len(data))+memfs.PageSize-1)/memfs.PageSize-first)
	}
	err := s.sendLocked(off, data)
	if err != nil && s.absorbLocked(err) {
		return nil
	}
	return err
}

// Flush pushes the stream's buffered frames; see WritePages for errors.
func (s *sink) Flush(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stream == nil {
		return nil
	}
	err := s.stream.Flush(s.ctx)
	if err != nil && s.absorbLocked(err) {
		return nil
	}
	return err
}

// absorbLocked reports whether err is one the protection repairs (and
// tells it so).
func (s *sink) absorbLocked(err error) bool {
	if errors.Is(err, backupclient.ErrBroken) || errors.Is(err, backupclient.ErrClosed) || s.ctx.Err() != nil {
		s.down.Store(true)
		if s.broken != nil {
			s.broken()
		}
		return true
	}
	return false
}

// sendLocked is the rate-limited send, accounted for the bandwidth
// measurement. Called with mu held and a stream attached.
func (s *sink) sendLocked(off int64, data []byte) error {
	t0 := time.Now()
	for rest := len(data); rest > 0 && !s.down.Load(); {
		n := min(rest, minBurst) // never above the burst, whatever SetRate does meanwhile
		if err := s.lim.WaitN(s.ctx, n); err != nil {
			return err
		}
		rest -= n
	}
	err := s.stream.SendPages(s.ctx, off, data)
	d := time.Since(t0)
	s.statMu.Lock()
	if err == nil {
		s.bytes += int64(len(data))
	}
	s.busy += d
	s.statMu.Unlock()
	return err
}

// take returns what was forwarded since the last take, the time spent
// forwarding it and the wall time that passed, and starts a new interval.
func (s *sink) take() (bytes int64, busy, wall time.Duration) {
	s.statMu.Lock()
	defer s.statMu.Unlock()
	now := time.Now()
	bytes, busy, wall = s.bytes, s.busy, now.Sub(s.since)
	s.bytes, s.busy, s.since = 0, 0, now
	return bytes, busy, wall
}
