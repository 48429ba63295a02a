package memserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/flush"
	"hostd/checkpoint/memfs"
	"hostd/checkpoint/pageset"
	"hostd/checkpoint/pki"
	"hostd/checkpoint/wire"
)

// Cost estimates of an evacuation besides the flush, measured with TCG
// guests under libvirt here (design.md: suspend + save 22 ms, state about
// 0.3-0.9 MB; a commit is a round trip plus the backup's fsyncs).
const (
	estPause      = 20 * time.Millisecond
	estState      = 40 * time.Millisecond
	estStateBytes = 512 << 10
	estCommit     = 50 * time.Millisecond
	safety        = 0.8
	// priorBandwidth is assumed until something is measured: low enough
	// that the first cap errs on the safe side, high enough not to
	// throttle a guest needlessly for the first second.
	priorBandwidth = 50e6
)

// Timing of the supervision loop.
const (
	tick       = 500 * time.Millisecond
	backoffMin = 250 * time.Millisecond
	backoffMax = 10 * time.Second
	// probeIdle: a connection that carried nothing for this long is
	// probed, so a backup that died under an idle guest shows as such.
	probeIdle = 2 * time.Second
	// copyRun is the first copy's unit: one read, then one send of what
	// no delivery touched meanwhile.
	copyRun = 1 << 20
	// statsWait: how long Status waits for the stream's counters before
	// it answers with the last ones seen.
	statsWait = 100 * time.Millisecond
)

// protection is one Protect's stream and the goroutines that keep it
// healthy: the first copy and the supervision loop.
type protection struct {
	srv    *server
	p      Protection // as asked, ID filled in
	stream *backupclient.Stream
	params flush.Params
	ctl    *flush.Controller
	ctx    context.Context // ends at Unprotect or shutdown
	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{} // the sink saw the stream fail: reconnect now
	copied chan struct{} // closed once the first copy is committed

	statsMu   sync.Mutex
	statsCh   chan backupclient.Stats // the outstanding query, if any
	lastStats backupclient.Stats

	commitMu sync.Mutex // device state + commit go together
	reconnMu sync.Mutex // one reconnect at a time

	mu             sync.Mutex
	copyDone       int64
	copyTotal      int64
	copyErr        error // the first copy failed for good
	suspect        error // a probe found the connection dead; Reconnect
	lastFailure    error // why the last reconnect failed
	reconnects     int64
	restorable     uint64
	acked          uint64 // the newest epoch this protection committed
	lastCommit     time.Time
	lastState      State
	win            commitWindow // since the last periodic commit
	seenReconnects int64
	lastSent       int64
	lastActive     time.Time
	lastProbe      time.Time
}

// params derives the flush parameters for a bound.
func (s *server) params(bound time.Duration) flush.Params {
	minCap := int64(queueBytes + 4<<20)
	return flush.Params{
		Bound: bound, Pause: estPause, State: estState, StateBytes: estStateBytes, Commit: estCommit,
		Safety: safety, MinCap: minCap, MaxCap: max(s.cfg.Size, minCap),
	}
}

func (s *server) protect(ctx context.Context, p Protection) error {
	op := "protect VM " + s.cfg.VM
	if err := s.lockOp(op); err != nil {
		return err
	}
	defer s.opMu.Unlock()
	s.mu.Lock()
	cur, lastBW := s.prot, s.lastBW
	s.mu.Unlock()
	if cur != nil {
		return conflict(fmt.Errorf("%s: already protected by backup %s as %q; Unprotect first", op, cur.p.Backup, cur.p.ID))
	}
	if p.ID == "" {
		p.ID = s.cfg.VM
	}
	host, _, err := net.SplitHostPort(p.Backup)
	switch {
	case err != nil:
		return badRequest(fmt.Errorf("%s: backup address %q: %w", op, p.Backup, err))
	case p.Bound <= 0:
		return badRequest(fmt.Errorf("%s: bound %v: must be positive (the time an evacuation may take)", op, p.Bound))
	case p.CommitInterval < 0:
		return badRequest(fmt.Errorf("%s: commit interval %v is negative", op, p.CommitInterval))
	case !(p.Rate >= 0):
		return badRequest(fmt.Errorf("%s: rate %v bytes/s is negative", op, p.Rate))
	}
	if err := wire.ValidVMID(p.ID); err != nil {
		return badRequest(fmt.Errorf("%s: id at the backup: %w", op, err))
	}
	// Fail on an unmeetable bound before touching the network: the fixed
	// costs alone may exceed it.
	bw := priorBandwidth
	if lastBW > 0 {
		bw = lastBW
	}
	if p.Rate > 0 {
		bw = min(bw, p.Rate)
	}
	params := s.params(p.Bound)
	if _, err := params.CapFor(p.Bound, bw); err != nil {
		return badRequest(fmt.Errorf("%s: bound %v at an estimated %.1f MB/s: %w", op, p.Bound, bw/1e6, err))
	}
	if p.TLS.ServerName == "" {
		p.TLS.ServerName = host
	}
	tc, err := pki.ClientConfig(p.TLS.CA, p.TLS.Cert, p.TLS.Key, p.TLS.ServerName)
	if err != nil {
		return badRequest(fmt.Errorf("%s: TLS files (ca %s, cert %s, key %s): %w", op, p.TLS.CA, p.TLS.Cert, p.TLS.Key, err))
	}
	stream, err := backupclient.Open(ctx, backupclient.Config{
		Addr: p.Backup, TLS: tc, VMID: p.ID, ImageSize: s.cfg.Size, Source: s.ram,
		Logger: s.log, DialTimeout: 10 * time.Second,
	})
	if err != nil {
		return badGateway(fmt.Errorf("%s: %w", op, err))
	}
	ctl, err := flush.NewController(params, s.fs, bw)
	if err != nil {
		stream.Close()
		s.fs.SetDirtyCap(unprotectedCap)
		return badRequest(fmt.Errorf("%s: %w", op, err))
	}
	pctx, cancel := context.WithCancel(s.ctx)
	pr := &protection{
		srv: s, p: p, stream: stream, params: params, ctl: ctl, ctx: pctx, cancel: cancel,
		kick: make(chan struct{}, 1), copied: make(chan struct{}),
		lastState: StateCopying, lastActive: time.Now(),
	}
	// A backup that already holds commits of this id holds an older image:
	// every page must be sent, zeros included, or stale pages would stay.
	committed := stream.Stats().Acked
	full := committed > 0
	if rs := s.restoring(); rs != nil {
		// A restored server's unwritten pages are the restore point's:
		// protected again to that same image at that same epoch, only
		// what the guest wrote since is new (no recopy); to anything
		// else, every page must go.
		full = !rs.sameRestorePoint(p.Backup, p.ID, committed)
	}
	s.mu.Lock()
	s.prot = pr
	s.rate = p.Rate
	s.mu.Unlock()
	s.sink.setRate(p.Rate)
	// Forward before taking the written set: a page written back from now
	// on reaches the stream, one written back before is in the set.
	s.sink.attach(pctx, stream, pr.wake)
	pr.wg.Add(2)
	go pr.firstCopy(full)
	go pr.supervise()
	s.log.Info("protected", "backup", p.Backup, "id", p.ID, "bound", p.Bound, "commit_interval", p.CommitInterval,
		"rate", p.Rate, "backup_committed", stream.Stats().Acked, "full_copy", full)
	return nil
}

func (s *server) unprotect() error {
	op := "unprotect VM " + s.cfg.VM
	if err := s.lockOp(op); err != nil {
		return err
	}
	defer s.opMu.Unlock()
	s.mu.Lock()
	p := s.prot
	s.prot = nil
	s.mu.Unlock()
	if p == nil {
		return conflict(fmt.Errorf("%s: not protected", op))
	}
	p.stop()
	s.log.Info("unprotected", "backup", p.p.Backup)
	return nil
}

// stop ends streaming: goroutines first (a wait on the rate limiter or a
// send on a slow link ends with the context), then the sink goes back to
// discarding and the stream closes. The uncommitted epoch is dropped by
// the backup.
func (p *protection) stop() {
	s := p.srv
	p.cancel()
	s.sink.detach()
	p.wg.Wait()
	p.stream.Close()
	s.sink.setRate(0)
	if err := s.fs.SetDirtyCap(unprotectedCap); err != nil {
		s.log.Warn("reset dirty cap", "err", err)
	}
	bw := p.ctl.State(time.Now(), 0).Bandwidth
	s.mu.Lock()
	s.lastBW = bw
	s.mu.Unlock()
}

// streamStats returns the stream's counters, or the last ones seen if the
// stream does not answer within statsWait. Stats takes the stream's lock,
// which a send blocked on a slow link holds for long; Status must answer
// meanwhile. One query at a time
// is outstanding.
func (p *protection) streamStats() backupclient.Stats {
	p.statsMu.Lock()
	ch := p.statsCh
	if ch == nil {
		ch = make(chan backupclient.Stats, 1)
		p.statsCh = ch
		go func() { ch <- p.stream.Stats() }()
	}
	p.statsMu.Unlock()
	t := time.NewTimer(statsWait)
	defer t.Stop()
	select {
	case st := <-ch:
		p.statsMu.Lock()
		if p.statsCh == ch {
			p.statsCh = nil
		}
		p.lastStats = st
		p.statsMu.Unlock()
		return st
	case <-t.C:
		p.statsMu.Lock()
		defer p.statsMu.Unlock()
		return p.lastStats
	}
}

// wake nudges the supervision loop (non-blocking).
func (p *protection) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// broken reports why the connection is not usable, or nil (as last seen:
// see streamStats).
func (p *protection) broken() error { return p.brokenAs(p.streamStats()) }

func (p *protection) brokenAs(st backupclient.Stats) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if st.Broken {
		if p.lastFailure != nil {
			return p.lastFailure
		}
		return backupclient.ErrBroken
	}
	return p.suspect
}

// reconnect repairs the connection if it is broken: Reconnect resends, from
// the RAM file, every page the backup has not acknowledged.
func (p *protection) reconnect(ctx context.Context) error {
	p.reconnMu.Lock()
	defer p.reconnMu.Unlock()
	// The stream's own word, waiting for it if need be: a needless
	// Reconnect would resend every unacknowledged page.
	if p.brokenAs(p.stream.Stats()) == nil {
		return nil
	}
	t0 := time.Now()
	err := p.stream.Reconnect(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.lastFailure = err
		return err
	}
	p.suspect, p.lastFailure = nil, nil
	p.reconnects++
	p.srv.sink.up()
	p.srv.log.Info("backup reconnected", "took", time.Since(t0), "reconnects", p.reconnects)
	return nil
}

// connected waits until the supervision loop has repaired the connection.
func (p *protection) connected(ctx context.Context) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for p.broken() != nil {
		p.wake()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// firstCopy sends every page memfs ever wrote back (all pages if full):
// while unprotected the sink discarded them, and a never-written page
// reads as zeros, which a new backup image holds already.
func (p *protection) firstCopy(full bool) {
	defer p.wg.Done()
	s := p.srv
	pages := s.cfg.Size / memfs.PageSize
	set := pageset.New(pages)
	if full {
		set.AddRange(0, pages)
	} else {
		set = s.fs.Written()
	}
	p.mu.Lock()
	p.copyTotal = set.Count() * memfs.PageSize
	p.mu.Unlock()
	t0 := time.Now()
	buf := make([]byte, copyRun)
	var err error
	set.Runs(copyRun/memfs.PageSize, func(first, n int64) bool {
		if err = p.connected(p.ctx); err != nil {
			return false
		}
		err = p.copyRun(first, n, buf[:n*memfs.PageSize], full)
		if errors.Is(err, backupclient.ErrBroken) {
			// The pages are owed by the stream now; its Reconnect
			// resends them. Go on once it is repaired.
			p.wake()
			err = nil
		}
		if err != nil {
			return false
		}
		p.mu.Lock()
		p.copyDone += n * memfs.PageSize
		p.mu.Unlock()
		return true
	})
	if err != nil {
		if p.ctx.Err() == nil {
			p.mu.Lock()
			p.copyErr = err
			p.mu.Unlock()
			s.log.Error("first copy failed", "err", err)
		}
		return
	}
	// One commit, so the backup holds a durable full copy.
	for {
		if err := p.connected(p.ctx); err != nil {
			return
		}
		if _, err := p.commit(p.ctx, false, nil); err == nil {
			break
		} else if p.ctx.Err() != nil {
			return
		} else if !errors.Is(err, backupclient.ErrBroken) {
			p.mu.Lock()
			p.copyErr = err
			p.mu.Unlock()
			s.log.Error("first copy: commit failed", "err", err)
			return
		}
	}
	close(p.copied)
	sent := p.streamStats().BytesSent
	p.mu.Lock()
	done := p.copyDone
	p.win = commitWindow{t0: time.Now(), sent0: sent}
	p.mu.Unlock()
	s.log.Info("first copy done", "bytes", done, "took", time.Since(t0))
	p.wake()
}

// copyRun sends n pages at first, read from the RAM file outside the
// sink's lock but under its watch (see sink): pages a delivery touched
// while the read ran are not sent.
func (p *protection) copyRun(first, n int64, buf []byte, full bool) error {
	s := p.srv
	off := first * memfs.PageSize
	s.sink.mu.Lock()
	if s.sink.stream != p.stream {
		s.sink.mu.Unlock()
		return p.ctx.Err() // detached: Unprotect is under way
	}
	watch := pageset.New(s.cfg.Size / memfs.PageSize)
	s.sink.watch = watch
	s.sink.mu.Unlock()

	var rerr error
	if full && s.restoring() == nil && !anyWritten(s.fs.Written(), first, n) {
		// Never written back: zeros, and no reason to fault the pages
		// into the page cache through FUSE just to read them.
		clear(buf)
	} else if _, err := s.ram.ReadAt(buf, off); err != nil {
		rerr = fmt.Errorf("first copy: read %d bytes of the RAM file at %d: %w", len(buf), off, err)
	}

	s.sink.mu.Lock()
	defer s.sink.mu.Unlock()
	s.sink.watch = nil
	if rerr != nil {
		return rerr
	}
	if s.sink.stream != p.stream {
		return p.ctx.Err()
	}
	// Send the untouched stretches.
	for q := first; q < first+n; {
		if watch.Has(q) {
			q++
			continue
		}
		e := q
		for e < first+n && !watch.Has(e) {
			e++
		}
		if err := s.sink.sendLocked(q*memfs.PageSize, buf[(q-first)*memfs.PageSize:(e-first)*memfs.PageSize]); err != nil {
			return err
		}
		q = e
	}
	return nil
}

func anyWritten(set *pageset.Set, first, n int64) bool {
	for q := first; q < first+n; q++ {
		if set.Has(q) {
			return true
		}
	}
	return false
}

// commit closes the current epoch, with the device state if any. Holding
// commitMu keeps the periodic commit from sealing a state into a
// non-restorable epoch between the two.
func (p *protection) commit(ctx context.Context, restorable bool, state []byte) (uint64, error) {
	p.commitMu.Lock()
	defer p.commitMu.Unlock()
	if state != nil {
		if err := p.stream.SendDeviceState(ctx, state); err != nil {
			return 0, err
		}
	}
	e, err := p.stream.Commit(ctx, restorable)
	if err != nil {
		return 0, err
	}
	p.mu.Lock()
	p.lastCommit = time.Now()
	p.acked = max(p.acked, e)
	if restorable {
		p.restorable = e
	}
	p.mu.Unlock()
	return e, nil
}

// waitCopied waits for the first copy: before it, the backup does not
// hold the VM's memory, so neither a flush nor a restore point means
// anything.
func (p *protection) waitCopied(ctx context.Context, op string) error {
	select {
	case <-p.copied:
		return nil
	default:
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		p.mu.Lock()
		cerr := p.copyErr
		p.mu.Unlock()
		if cerr != nil {
			return badGateway(fmt.Errorf("%s: the first copy to the backup failed: %w (Unprotect and Protect again)", op, cerr))
		}
		select {
		case <-p.copied:
			return nil
		case <-ctx.Done():
			p.mu.Lock()
			done, total := p.copyDone, p.copyTotal
			p.mu.Unlock()
			return fmt.Errorf("%s: waiting for the first copy (%d of %d bytes): %w", op, done, total, ctx.Err())
		case <-t.C:
		}
	}
}

// withConnection runs f, repairing a broken connection before it and once
// more if f breaks it.
func (p *protection) withConnection(ctx context.Context, op string, f func() error) error {
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		if rerr := p.reconnect(ctx); rerr != nil {
			return badGateway(fmt.Errorf("%s: backup %s unreachable: %w", op, p.p.Backup, rerr))
		}
		if err = f(); err == nil || !errors.Is(err, backupclient.ErrBroken) {
			break
		}
	}
	if err != nil {
		return badGateway(fmt.Errorf("%s: %w", op, err))
	}
	return nil
}

func (s *server) sync(ctx context.Context) (SyncReport, error) {
	op := "sync VM " + s.cfg.VM
	if err := s.lockOp(op); err != nil {
		return SyncReport{}, err
	}
	defer s.opMu.Unlock()
	p, err := s.protection(op)
	if err != nil {
		return SyncReport{}, err
	}
	if err := p.waitCopied(ctx, op); err != nil {
		return SyncReport{}, err
	}
	t0 := time.Now()
	rep := SyncReport{Bytes: s.unflushed()}
	// memfs's fsync makes the kernel write back every dirty page, waits
	// until each reached the sink and flushes it. Pages the sink could
	// not send (broken stream) are owed and go out with the reconnect.
	if err := s.fs.Sync(ctx); err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}
	if err := p.withConnection(ctx, op, func() error { return p.stream.Flush(ctx) }); err != nil {
		return rep, err
	}
	rep.Duration = time.Since(t0)
	s.log.Info("synced", "bytes", rep.Bytes, "took", rep.Duration)
	return rep, nil
}

func (s *server) commit(ctx context.Context, state []byte) (CommitReport, error) {
	op := "commit VM " + s.cfg.VM
	if len(state) == 0 {
		return CommitReport{}, badRequest(fmt.Errorf("%s: no device state (a restore point needs one)", op))
	}
	if err := s.lockOp(op); err != nil {
		return CommitReport{}, err
	}
	defer s.opMu.Unlock()
	p, err := s.protection(op)
	if err != nil {
		return CommitReport{}, err
	}
	if err := p.waitCopied(ctx, op); err != nil {
		return CommitReport{}, err
	}
	t0 := time.Now()
	rep := CommitReport{StateBytes: int64(len(state))}
	// A reconnect drops the device state of the failed epoch, so a retry
	// sends it again.
	err = p.withConnection(ctx, op, func() error {
		e, err := p.commit(ctx, true, state)
		rep.Epoch = e
		return err
	})
	if err != nil {
		return rep, err
	}
	rep.Duration = time.Since(t0)
	s.log.Info("restore point committed", "epoch", rep.Epoch, "state_bytes", rep.StateBytes, "took", rep.Duration)
	return rep, nil
}

// supervise is the protection's loop: bandwidth into the controller, the
// periodic commit, reconnects with backoff, the state for Status.
func (p *protection) supervise() {
	defer p.wg.Done()
	s := p.srv
	backoff := backoffMin
	var retryAt time.Time
	timer := time.NewTimer(tick)
	defer timer.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-timer.C:
		case <-p.kick:
		}
		now := time.Now()
		wait := tick
		if why := p.broken(); why != nil {
			if !now.Before(retryAt) {
				if err := p.reconnect(p.ctx); err != nil {
					if p.ctx.Err() != nil {
						return
					}
					s.log.Warn("backup unreachable", "err", err, "retry_in", backoff)
					retryAt = now.Add(backoff)
					backoff = min(2*backoff, backoffMax)
				} else {
					backoff, retryAt = backoffMin, time.Time{}
				}
			}
			if !retryAt.IsZero() {
				wait = min(wait, max(time.Until(retryAt), time.Millisecond))
			}
		}
		p.observeBandwidth(now)
		if err := p.ctl.Tick(now); err != nil && !errors.Is(err, flush.ErrImpossible) {
			s.log.Warn("apply dirty cap", "err", err)
		}
		p.periodicCommit(now)
		p.probe(now)
		p.noteState(now)
		timer.Reset(wait)
	}
}

// observeBandwidth feeds the controller with what the link can carry.
//
// The sink's figure: bytes over the time spent sending them, in an
// interval where it was sending at least half the time, so that the link
// and not the guest was the limit (memfs's queue backlogged). Without
// periodic commits it is the only one.
//
// The commit window's figure (periodic commits only): bytes from one
// commit's ack to the next, the backup's fsync included, again only if the
// sink was backlogged over the window. The stream's own Bandwidth() is not
// used: it averages every epoch of 1 MiB or more, and an epoch in which
// the guest dirtied little measures the guest, not the link; fed to the
// controller (which follows drops at once) it would throttle the guest
// for nothing.
//
// With a share set, the VM may use at most that.
func (p *protection) observeBandwidth(now time.Time) {
	s := p.srv
	bytes, busy, wall := s.sink.take()
	p.mu.Lock()
	p.win.busy += busy
	p.win.wall += wall
	// A reconnect holds the stream while it resends: the sink's waits
	// for it measure the outage, not the link.
	disturbed := p.reconnects != p.seenReconnects
	p.seenReconnects = p.reconnects
	p.mu.Unlock()
	var sample float64
	if !disturbed && p.broken() == nil && wall > 0 && busy >= wall/2 && bytes >= 256<<10 {
		sample = float64(bytes) / busy.Seconds()
	}
	p.feed(now, sample)
}

// feed gives the controller a sample (0: none), clipped to the share.
func (p *protection) feed(now time.Time, sample float64) {
	s := p.srv
	s.mu.Lock()
	limit := s.rate
	s.mu.Unlock()
	if limit > 0 {
		cur := p.ctl.State(now, 0).Bandwidth
		switch {
		case sample > limit:
			sample = limit
		case sample == 0 && cur > limit:
			sample = limit // a new, lower share applies at once
		}
	}
	if sample > 0 {
		if err := p.ctl.ObserveBandwidth(now, sample); err != nil && !errors.Is(err, flush.ErrImpossible) {
			s.log.Warn("apply dirty cap", "err", err)
		}
	}
}

// commitWindow measures the window that a periodic commit closed.
type commitWindow struct {
	t0         time.Time
	sent0      int64
	busy, wall time.Duration
}

// periodicCommit commits a non-restorable epoch every CommitInterval, once
// the first copy is in. A restore point being made (commitMu held) wins.
func (p *protection) periodicCommit(now time.Time) {
	if p.p.CommitInterval <= 0 || p.broken() != nil {
		return
	}
	select {
	case <-p.copied:
	default:
		return
	}
	p.mu.Lock()
	due := now.Sub(p.lastCommit) >= p.p.CommitInterval
	p.mu.Unlock()
	if !due || !p.commitMu.TryLock() {
		return
	}
	p.commitMu.Unlock()
	ctx, cancel := context.WithTimeout(p.ctx, max(30*time.Second, p.p.Bound))
	defer cancel()
	if _, err := p.commit(ctx, false, nil); err != nil {
		if p.ctx.Err() == nil {
			p.srv.log.Warn("periodic commit failed", "err", err)
			p.wake()
		}
		return
	}
	end := time.Now()
	sent := p.streamStats().BytesSent
	p.mu.Lock()
	w := p.win
	p.win = commitWindow{t0: end, sent0: sent}
	p.mu.Unlock()
	if !w.t0.IsZero() && w.busy >= w.wall/2 && sent-w.sent0 >= 1<<20 {
		p.feed(end, float64(sent-w.sent0)/end.Sub(w.t0).Seconds())
	}
}

// probe asks the backup for one page when the connection has been idle:
// the stream notices a dead peer only when it sends, and an idle guest
// sends nothing, so without this a dead backup would look healthy. Only
// once something is committed: there is nothing to read before.
func (p *protection) probe(now time.Time) {
	st := p.streamStats()
	p.mu.Lock()
	if st.BytesSent != p.lastSent {
		p.lastSent, p.lastActive = st.BytesSent, now
	}
	due := st.Acked > 0 && !st.Broken && p.suspect == nil &&
		now.Sub(p.lastActive) >= probeIdle && now.Sub(p.lastProbe) >= probeIdle
	if due {
		p.lastProbe = now
	}
	p.mu.Unlock()
	if !due {
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	var page [memfs.PageSize]byte
	if err := p.stream.ReadPages(ctx, 0, page[:]); err != nil && p.ctx.Err() == nil {
		p.srv.log.Warn("backup connection probe failed", "err", err)
		p.mu.Lock()
		p.suspect = fmt.Errorf("probe: %w", err)
		p.mu.Unlock()
		p.wake()
	}
}

// noteState logs state changes (Status computes the state itself).
func (p *protection) noteState(now time.Time) {
	var st Status
	p.fill(now, &st)
	p.mu.Lock()
	prev := p.lastState
	p.lastState = st.State
	p.mu.Unlock()
	if st.State != prev {
		p.srv.log.Info("protection state", "from", prev, "to", st.State, "reason", st.Reason)
	}
}

// fill completes a Status with the protection's figures and state.
func (p *protection) fill(now time.Time, st *Status) {
	s := p.srv
	ss := p.streamStats()
	why := p.brokenAs(ss)
	unflushed := s.unflushed()
	if why != nil {
		// Pages the broken connection owes are as unflushed as dirty ones.
		unflushed += ss.PendingPages * memfs.PageSize
	}
	cs := p.ctl.State(now, unflushed)
	p.mu.Lock()
	defer p.mu.Unlock()
	st.Backup, st.ID = p.p.Backup, p.p.ID
	st.CopyDone, st.CopyTotal = p.copyDone, p.copyTotal
	st.Unflushed, st.Cap, st.Bandwidth, st.Bound, st.Notice = unflushed, cs.Cap, cs.Bandwidth, cs.Bound, cs.Notice
	st.Headroom = cs.Headroom
	st.PredictedEvacuation = cs.Bound - cs.Headroom
	// The stream's counters may be a moment old (see streamStats); what
	// this protection committed itself is not.
	st.AckedEpoch, st.RestorableEpoch, st.LastCommit = max(ss.Acked, p.acked), p.restorable, p.lastCommit
	st.Reconnects, st.BytesSent = p.reconnects, ss.BytesSent
	copied := false
	select {
	case <-p.copied:
		copied = true
	default:
	}
	switch {
	case p.copyErr != nil:
		st.State, st.Reason = StateDegraded, fmt.Sprintf("first copy failed: %v; Unprotect and Protect again", p.copyErr)
	case why != nil:
		st.State = StateDegraded
		st.Reason = fmt.Sprintf("backup %s unreachable, reconnecting: %v", p.p.Backup, why)
		if !copied {
			st.Reason += fmt.Sprintf(" (first copy paused at %d of %d bytes)", p.copyDone, p.copyTotal)
		}
	case !copied:
		st.State = StateCopying
	case cs.Err != nil:
		st.State, st.Reason = StateDegraded, fmt.Sprintf("bound at risk: %v", cs.Err)
	case cs.Headroom < 0:
		st.State = StateDegraded
		st.Reason = fmt.Sprintf("bound at risk: evacuating %d unflushed bytes at %.1f MB/s would take %v, bound is %v",
			unflushed, cs.Bandwidth/1e6, st.PredictedEvacuation.Round(time.Millisecond), cs.Bound)
	default:
		st.State = StateProtected
	}
}
