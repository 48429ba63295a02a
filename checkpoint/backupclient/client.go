package backupclient

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"hostd/checkpoint/pageset"
	"hostd/checkpoint/wire"
)

// ErrClosed: the stream was closed.
var ErrClosed = errors.New("backup stream closed")

// ErrBroken wraps the failure that broke a stream's connection; Reconnect
// repairs it.
var ErrBroken = errors.New("backup stream broken")

// errReconnecting is why sends fail while Reconnect dials.
var errReconnecting = errors.New("reconnect under way")

// Config describes one VM's stream.
type Config struct {
	Addr      string      // backup server host:port
	TLS       *tls.Config // from pki.ClientConfig: TLS 1.3, client certificate
	VMID      string
	ImageSize int64
	// Source reads the VM's current memory for resync (the RAM file). If
	// nil, a stream cannot recover pages lost with a connection.
	Source io.ReaderAt
	Logger *slog.Logger
	// DialTimeout bounds connect + handshake + welcome; default 10 s.
	DialTimeout time.Duration
}

// Stream is one VM's connection to its backup. SendPages, SendDeviceState
// and Commit may be called from different goroutines (memfs delivers pages
// while a controller commits); sends are serialised.
type Stream struct {
	cfg Config
	log *slog.Logger

	commitMu sync.Mutex // one Commit at a time

	mu        sync.Mutex // guards everything below and the writer
	conn      net.Conn
	w         *wire.Writer
	broken    error
	closed    bool
	epoch     uint64 // epoch being sent
	acked     uint64 // last acknowledged epoch
	sent      map[uint64]*pageset.Set
	count     uint64 // extents in the current epoch
	bytes     uint64
	digest    uint32
	stateLen  uint64
	stateCRC  uint32
	epochT0   time.Time
	total     int64
	bw        float64 // bytes/s, EWMA over commits
	acks      chan ackOrErr
	readerEnd chan struct{}
	// watch collects the pages SendPages is handed while a Reconnect
	// resends (nil otherwise): see Reconnect.
	watch *pageset.Set
	// resyncing: a Reconnect has a new connection but has not resent
	// every owed page yet. Sends go through; Stats reports Broken.
	resyncing bool

	// Lazy-restore reads in flight, answered by the reader goroutine.
	// A lock of their own: the reader must never wait for mu, which a
	// sender blocked on a slow link may hold.
	fetchMu      sync.Mutex
	fetches      map[uint64]*fetchReq
	fetchID      uint64
	fetchBroken  error
	restoreState uint64      // device-state length of the backup's restore point
	peerErr      *wire.Error // the Error frame that ended the connection
}

type fetchReq struct {
	off       uint64
	state     bool
	dst       []byte
	done      chan error
	abandoned bool // the caller gave up; drop the answer when it comes
}

type ackOrErr struct {
	epoch uint64
	err   error
}

// Open connects and says hello. If the backup knows the VM already, the
// stream continues after its last committed epoch; pages are not re-sent
// (call Resync for that when the host's own record was lost).
func Open(ctx context.Context, cfg Config) (*Stream, error) {
	if err := wire.ValidVMID(cfg.VMID); err != nil {
		return nil, fmt.Errorf("open backup stream: %w", err)
	}
	if cfg.ImageSize <= 0 || cfg.ImageSize%wire.PageSize != 0 {
		return nil, fmt.Errorf("open backup stream %s: image size %d not a positive multiple of %d", cfg.VMID, cfg.ImageSize, wire.PageSize)
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	l := cfg.Logger
	if l == nil {
		l = slog.Default()
	}
	s := &Stream{cfg: cfg, log: l.With("component", "backupclient", "vm", cfg.VMID), sent: map[uint64]*pageset.Set{}}
	c, committed, err := s.dial(ctx, 1)
	if err != nil {
		return nil, err
	}
	s.attach(c)
	s.acked, s.epoch = committed, committed+1
	s.startEpoch()
	return s, nil
}

// dial connects, handshakes and exchanges Hello/Welcome.
func (s *Stream) dial(ctx context.Context, epoch uint64) (net.Conn, uint64, error) {
	op := fmt.Sprintf("connect backup %s for %s", s.cfg.Addr, s.cfg.VMID)
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	d := tls.Dialer{Config: s.cfg.TLS}
	c, err := d.DialContext(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", op, err)
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	w := wire.NewWriter(c)
	err = w.Write(&wire.Hello{Version: wire.Version, VMID: s.cfg.VMID, ImageSize: uint64(s.cfg.ImageSize), Epoch: epoch})
	if err == nil {
		err = w.Flush()
	}
	if err != nil {
		c.Close()
		return nil, 0, fmt.Errorf("%s: hello: %w", op, err)
	}
	m, err := wire.NewReader(c).Read()
	if err != nil {
		c.Close()
		return nil, 0, fmt.Errorf("%s: welcome: %w", op, err)
	}
	switch m := m.(type) {
	case *wire.Welcome:
		if int64(m.ImageSize) != s.cfg.ImageSize {
			c.Close()
			return nil, 0, fmt.Errorf("%s: backup holds an image of %d bytes, VM has %d", op, m.ImageSize, s.cfg.ImageSize)
		}
		s.fetchMu.Lock()
		s.restoreState = m.StateLen
		s.fetchMu.Unlock()
		return c, m.Committed, nil
	case *wire.Error:
		c.Close()
		return nil, 0, fmt.Errorf("%s: %w", op, m)
	default:
		c.Close()
		return nil, 0, fmt.Errorf("%s: expected welcome, got %s: %w", op, m.Type(), wire.ErrMalformed)
	}
}

// attach makes c the stream's connection and starts its ack reader. The
// reader owns the read side: it turns Acks and Errors into acks messages
// and ends when the connection does. Called with mu held or before the
// stream is shared.
func (s *Stream) attach(c net.Conn) {
	s.conn, s.w, s.broken = c, wire.NewWriter(c), nil
	acks := make(chan ackOrErr, 16)
	end := make(chan struct{})
	s.acks, s.readerEnd = acks, end
	s.fetchMu.Lock()
	s.fetches, s.fetchBroken, s.peerErr = map[uint64]*fetchReq{}, nil, nil
	s.fetchMu.Unlock()
	// The reader gets its own buffered reader; Welcome was read with
	// another, which consumed nothing beyond it (the server sends nothing
	// before our first Commit).
	go func() {
		defer close(end)
		r := wire.NewReader(c)
		for {
			m, err := r.Read()
			if err != nil {
				err = fmt.Errorf("read from backup: %w", err)
				s.failFetches(err)
				acks <- ackOrErr{err: err}
				return
			}
			switch m := m.(type) {
			case *wire.Pages:
				if err := s.answerFetch(m); err != nil {
					s.failFetches(err)
					acks <- ackOrErr{err: err}
					return
				}
			case *wire.Ack:
				acks <- ackOrErr{epoch: m.Epoch}
			case *wire.Error:
				err := fmt.Errorf("backup: %w", m)
				s.fetchMu.Lock()
				s.peerErr = &wire.Error{Code: m.Code, Message: m.Message}
				s.fetchMu.Unlock()
				s.failFetches(err)
				acks <- ackOrErr{err: err}
				return
			default:
				err := fmt.Errorf("backup sent unexpected %s: %w", m.Type(), wire.ErrMalformed)
				s.failFetches(err)
				acks <- ackOrErr{err: err}
				return
			}
		}
	}()
}

func (s *Stream) startEpoch() {
	s.count, s.bytes, s.digest, s.stateLen, s.stateCRC = 0, 0, 0, 0, 0
	s.epochT0 = time.Time{}
	if s.sent[s.epoch] == nil {
		s.sent[s.epoch] = pageset.New(s.cfg.ImageSize / wire.PageSize)
	}
}

// breakLocked records a send failure: the connection is dropped and every
// call fails with ErrBroken until Reconnect.
func (s *Stream) breakLocked(err error) error {
	if s.broken == nil {
		// If the backup ended the session with an Error frame, that is the
		// cause, not the write failure it led to: wait for the reader to
		// finish (it exits once the connection is closed) and look.
		s.conn.Close()
		<-s.readerEnd
		s.fetchMu.Lock()
		if pe := s.peerErr; pe != nil {
			err = fmt.Errorf("backup: %w (then %v)", pe, err)
		}
		s.fetchMu.Unlock()
		s.broken = err
		s.log.Warn("backup stream broken", "err", err)
	}
	return fmt.Errorf("%w: %w", ErrBroken, s.broken)
}

func (s *Stream) usableLocked(op string) error {
	if s.closed {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if s.broken != nil {
		return fmt.Errorf("%s: %w: %w", op, ErrBroken, s.broken)
	}
	return nil
}

// SendPages sends page data at a guest-physical offset (page aligned,
// multiple pages). Large data is cut into frames of wire.MaxData. The pages
// count as unacknowledged until the epoch they went into is committed: if
// the send fails, they stay recorded for Reconnect.
func (s *Stream) SendPages(ctx context.Context, off int64, data []byte) error {
	op := fmt.Sprintf("send %d bytes at %d for %s", len(data), off, s.cfg.VMID)
	if off < 0 || off%wire.PageSize != 0 || len(data)%wire.PageSize != 0 || off+int64(len(data)) > s.cfg.ImageSize {
		return fmt.Errorf("%s: not page aligned or outside image of %d: %w", op, s.cfg.ImageSize, wire.ErrMalformed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Record first: whatever happens next, these pages are owed.
	s.sent[s.epoch].AddRange(off/wire.PageSize, int64(len(data))/wire.PageSize)
	if s.watch != nil {
		s.watch.AddRange(off/wire.PageSize, int64(len(data))/wire.PageSize)
	}
	if err := s.usableLocked(op); err != nil {
		return err
	}
	// A send blocks while the backup is slower than the guest (that is
	// the throttle); cancelling ctx unblocks it by failing the write, which
	// breaks the stream: a frame cannot be half sent.
	c := s.conn
	stop := context.AfterFunc(ctx, func() { c.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	return s.sendLocked(op, off, data)
}

func (s *Stream) sendLocked(op string, off int64, data []byte) error {
	if s.epochT0.IsZero() {
		s.epochT0 = time.Now()
	}
	for len(data) > 0 {
		n := min(len(data), wire.MaxData)
		chunk := data[:n]
		c := wire.Checksum(chunk)
		if err := s.w.Write(&wire.Extent{Epoch: s.epoch, Offset: uint64(off), CRC: c, Data: chunk}); err != nil {
			return fmt.Errorf("%s: %w", op, s.breakLocked(err))
		}
		s.count++
		s.bytes += uint64(n)
		s.total += int64(n)
		s.digest = wire.UpdateChecksum(s.digest, binary.BigEndian.AppendUint32(nil, c))
		data, off = data[n:], off+int64(n)
	}
	return nil
}

// SendDeviceState sends the device-state blob of the current epoch. Call
// it once per restore point, after the VM is paused and its pages flushed.
func (s *Stream) SendDeviceState(ctx context.Context, blob []byte) error {
	op := fmt.Sprintf("send device state (%d bytes) for %s", len(blob), s.cfg.VMID)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usableLocked(op); err != nil {
		return err
	}
	if s.stateLen != 0 {
		return fmt.Errorf("%s: epoch %d already has device state", op, s.epoch)
	}
	for off := 0; off < len(blob); {
		n := min(len(blob)-off, wire.MaxData)
		chunk := blob[off : off+n]
		if err := s.w.Write(&wire.StateChunk{Epoch: s.epoch, Offset: uint64(off), CRC: wire.Checksum(chunk), Data: chunk}); err != nil {
			return fmt.Errorf("%s: %w", op, s.breakLocked(err))
		}
		s.stateCRC = wire.UpdateChecksum(s.stateCRC, chunk)
		off += n
	}
	s.stateLen = uint64(len(blob))
	return nil
}

// Flush pushes buffered frames to the network. It does not wait for the
// backup: durability is Commit's.
func (s *Stream) Flush(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	op := "flush stream of " + s.cfg.VMID
	if err := s.usableLocked(op); err != nil {
		return err
	}
	if err := s.w.Flush(); err != nil {
		return fmt.Errorf("%s: %w", op, s.breakLocked(err))
	}
	return nil
}

// Commit closes the current epoch and waits until the backup has made it
// durable. restorable marks a restore point (VM paused, device state sent).
// Pages may be sent concurrently; they go into the next epoch.
func (s *Stream) Commit(ctx context.Context, restorable bool) (uint64, error) {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.mu.Lock()
	op := fmt.Sprintf("commit epoch %d of %s", s.epoch, s.cfg.VMID)
	if err := s.usableLocked(op); err != nil {
		s.mu.Unlock()
		return 0, err
	}
	e := s.epoch
	cm := &wire.Commit{Epoch: e, Extents: s.count, Bytes: s.bytes, Digest: s.digest, StateLen: s.stateLen, StateCRC: s.stateCRC, Restorable: restorable}
	err := s.w.Write(cm)
	if err == nil {
		err = s.w.Flush()
	}
	if err != nil {
		err = s.breakLocked(err)
		s.mu.Unlock()
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	bytes, t0 := s.bytes, s.epochT0
	s.epoch++
	s.startEpoch()
	acks := s.acks
	s.mu.Unlock()

	select {
	case a := <-acks:
		s.mu.Lock()
		defer s.mu.Unlock()
		if a.err != nil {
			return 0, fmt.Errorf("%s: %w", op, s.breakLocked(a.err))
		}
		if a.epoch != e {
			return 0, fmt.Errorf("%s: backup acknowledged epoch %d: %w", op, a.epoch, s.breakLocked(wire.ErrMalformed))
		}
		s.ackLocked(e, bytes, t0)
		return e, nil
	case <-ctx.Done():
		s.mu.Lock()
		defer s.mu.Unlock()
		// The ack may still come, but we cannot tell which epoch a late
		// one belongs to any more: start over on a new connection.
		return 0, fmt.Errorf("%s: %w", op, s.breakLocked(ctx.Err()))
	}
}

// ackLocked forgets the pages of acknowledged epochs and updates the
// bandwidth estimate from this epoch: bytes over the time from its first
// send to its durable ack, which includes the backup's fsync.
func (s *Stream) ackLocked(e, bytes uint64, t0 time.Time) {
	for k := range s.sent {
		if k <= e {
			delete(s.sent, k)
		}
	}
	s.acked = e
	if !t0.IsZero() && bytes >= 1<<20 {
		b := float64(bytes) / time.Since(t0).Seconds()
		if s.bw == 0 {
			s.bw = b
		} else {
			s.bw = 0.7*s.bw + 0.3*b
		}
	}
}

// Bandwidth is the measured rate at which the backup makes pages durable,
// in bytes per second (0 before the first large commit).
func (s *Stream) Bandwidth() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bw
}

// Stats is a snapshot of the stream's counters.
type Stats struct {
	Acked        uint64 // last acknowledged epoch
	Epoch        uint64 // epoch being sent
	BytesSent    int64
	PendingPages int64 // sent or owed, not yet acknowledged
	// Broken: the connection failed, or a Reconnect has not finished
	// resending the owed pages (the backup lacks them until it has).
	Broken bool
}

// Stats returns the counters.
func (s *Stream) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Acked: s.acked, Epoch: s.epoch, BytesSent: s.total, PendingPages: s.pendingLocked().Count(), Broken: s.broken != nil || s.resyncing}
}

func (s *Stream) pendingLocked() *pageset.Set {
	p := pageset.New(s.cfg.ImageSize / wire.PageSize)
	for _, set := range s.sent {
		p.Union(set)
	}
	return p
}

// Reconnect replaces a broken (or suspect) connection and resyncs: every
// page not covered by an acknowledged commit is read from Config.Source and
// sent again in the epoch after the backup's last committed one. If the
// backup has lost commits it had acknowledged (a new or wiped server), the
// whole image is sent. Device state of a failed restore point is not kept:
// send it again, then Commit.
//
// The stream's lock is held across neither a read of Source nor the dial.
// Source is the RAM file, a FUSE file this process serves: a read (or the
// FLUSH of closing it) can wait for the writeback of a page, whose FUSE
// WRITE waits for room in memfs's queue, which only a delivery frees, and
// a delivery is SendPages, which needs the lock: held, that is a deadlock.
// A dial to a backup that does not answer takes DialTimeout: held, that
// would stall the guest's writeback as long. So the owed pages are
// read unlocked, and each run is sent under the lock minus the pages
// SendPages was handed since the resend began (the watch). Such a page was
// written back after the watch opened, and that delivery either carries
// data at least as new as the read, or the page was dirtied again after it
// and will be delivered again; either way the read copy must not follow it
// onto the wire, where it would overwrite newer data.
//
// Pages keep being delivered meanwhile, into the new epoch, so the guest
// is not held up by the resend beyond the link they share. Stats reports
// the stream broken until the resend is done; if it fails, the stream is
// broken for real (Commit must not seal an epoch that lacks owed pages)
// and the next Reconnect resends them all.
func (s *Stream) Reconnect(ctx context.Context) (err error) {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	op := "reconnect backup stream of " + s.cfg.VMID
	pending, committed, err := s.redial(ctx, op)
	if err != nil {
		return err
	}
	defer func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.watch, s.resyncing = nil, false
		if err != nil && !s.closed {
			s.breakLocked(err)
		}
	}()
	// A backup with nothing committed holds an all-zero image: zero pages
	// need not travel.
	skipZero := committed == 0
	buf := make([]byte, wire.MaxData)
	var rerr error
	var resent int64
	pending.Runs(wire.MaxData/wire.PageSize, func(first, n int64) bool {
		if rerr = ctx.Err(); rerr != nil {
			return false
		}
		b := buf[:n*wire.PageSize]
		if _, rerr = s.cfg.Source.ReadAt(b, first*wire.PageSize); rerr != nil {
			rerr = fmt.Errorf("read source: %w", rerr)
			return false
		}
		var sent int64
		sent, rerr = s.resendRun(ctx, op, first, b, skipZero)
		resent += sent
		return rerr == nil
	})
	if rerr != nil {
		return fmt.Errorf("%s: resync: %w", op, rerr)
	}
	if err := s.Flush(ctx); err != nil {
		return fmt.Errorf("%s: resync: %w", op, err)
	}
	s.log.Info("backup stream reconnected", "backup_committed", committed, "owed_pages", pending.Count(), "resent_bytes", resent)
	return nil
}

// redial is Reconnect's first half: a new connection, and every page owed
// to the backup recorded in its first epoch before any is resent, so a
// resend that fails half way leaves the next Reconnect knowing all of
// them. It returns the owed pages (with the watch open if there are any)
// and the backup's last committed epoch.
func (s *Stream) redial(ctx context.Context, op string) (*pageset.Set, uint64, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, 0, fmt.Errorf("%s: %w", op, ErrClosed)
	}
	s.conn.Close()
	<-s.readerEnd
	if s.broken == nil {
		// Sends fail fast (their pages owed) until the new connection
		// is up, rather than waiting for the dial.
		s.broken = errReconnecting
	}
	acked := s.acked // stable: Commit needs commitMu, which we hold
	s.mu.Unlock()

	c, committed, err := s.dial(ctx, acked+1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.broken = err
		return nil, 0, err
	}
	if s.closed {
		c.Close()
		return nil, 0, fmt.Errorf("%s: %w", op, ErrClosed)
	}
	s.attach(c)
	pending := s.pendingLocked()
	if committed < s.acked {
		s.log.Warn("backup lost acknowledged epochs: full resync", "backup_committed", committed, "acked", s.acked)
		pending.AddRange(0, pending.Len())
	}
	s.sent = map[uint64]*pageset.Set{}
	s.acked, s.epoch = committed, committed+1
	s.startEpoch()
	s.sent[s.epoch].Union(pending)
	if pending.Count() > 0 {
		if s.cfg.Source == nil {
			err := fmt.Errorf("%s: %d pages to resend and no source", op, pending.Count())
			s.breakLocked(err)
			return nil, 0, err
		}
		s.watch = pageset.New(pending.Len())
	}
	s.resyncing = true
	return pending, committed, nil
}

// resendRun sends the pages of b (read from Source at page first) that no
// SendPages was handed since the watch opened, and, if skipZero, that are
// not all zero. It returns the bytes sent.
func (s *Stream) resendRun(ctx context.Context, op string, first int64, b []byte, skipZero bool) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usableLocked(op); err != nil {
		return 0, err
	}
	c := s.conn
	stop := context.AfterFunc(ctx, func() { c.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	page := func(i int64) []byte { return b[i*wire.PageSize : (i+1)*wire.PageSize] }
	wanted := func(i int64) bool { return !s.watch.Has(first+i) && !(skipZero && allZero(page(i))) }
	n := int64(len(b)) / wire.PageSize
	var sent int64
	for i := int64(0); i < n; {
		if !wanted(i) {
			i++
			continue
		}
		e := i + 1
		for e < n && wanted(e) {
			e++
		}
		if err := s.sendLocked(op, (first+i)*wire.PageSize, b[i*wire.PageSize:e*wire.PageSize]); err != nil {
			return sent, err
		}
		sent += (e - i) * wire.PageSize
		i = e
	}
	return sent, nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Close ends the stream; an uncommitted epoch is discarded by the backup.
func (s *Stream) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.conn.Close()
	<-s.readerEnd
	return err
}

// WritePages and Flush make a Stream a memfs sink: the dirty-page stream
// of the VM's RAM file goes straight to the backup.
func (s *Stream) WritePages(ctx context.Context, off int64, data []byte) error {
	return s.SendPages(ctx, off, data)
}

// answerFetch hands a Pages frame to the Fetch waiting for it.
func (s *Stream) answerFetch(m *wire.Pages) error {
	s.fetchMu.Lock()
	req := s.fetches[m.ID]
	delete(s.fetches, m.ID)
	s.fetchMu.Unlock()
	if req != nil && req.abandoned {
		return nil
	}
	if req == nil || req.off != m.Offset || (len(m.Data) != len(req.dst) && !req.state) || len(m.Data) > len(req.dst) {
		return fmt.Errorf("backup answered fetch %d (%d bytes at %d) that was not asked: %w", m.ID, len(m.Data), m.Offset, wire.ErrMalformed)
	}
	n := copy(req.dst, m.Data)
	req.dst = req.dst[:n]
	req.done <- nil
	return nil
}

func (s *Stream) failFetches(err error) {
	s.fetchMu.Lock()
	defer s.fetchMu.Unlock()
	s.fetchBroken = err
	for id, req := range s.fetches {
		req.done <- err
		delete(s.fetches, id)
	}
}

// fetch asks the backup for one chunk and waits for the answer.
func (s *Stream) fetch(ctx context.Context, op string, off uint64, dst []byte, state bool) ([]byte, error) {
	req := &fetchReq{off: off, state: state, dst: dst, done: make(chan error, 1)}
	s.fetchMu.Lock()
	if s.fetchBroken != nil {
		err := s.fetchBroken
		s.fetchMu.Unlock()
		return nil, fmt.Errorf("%s: %w: %w", op, ErrBroken, err)
	}
	s.fetchID++
	id := s.fetchID
	s.fetches[id] = req
	s.fetchMu.Unlock()

	s.mu.Lock()
	err := s.usableLocked(op)
	if err == nil {
		err = s.w.Write(&wire.Fetch{ID: id, Offset: off, Length: uint32(len(dst)), State: state})
		if err == nil {
			err = s.w.Flush()
		}
		if err != nil {
			err = fmt.Errorf("%s: %w", op, s.breakLocked(err))
		}
	}
	s.mu.Unlock()
	if err != nil {
		s.fetchMu.Lock()
		delete(s.fetches, id)
		s.fetchMu.Unlock()
		return nil, err
	}
	select {
	case err := <-req.done:
		if err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		return req.dst, nil
	case <-ctx.Done():
		// The answer still comes (answers are in order): leave the
		// request registered so the reader can drop it, but stop it from
		// writing into a buffer the caller may reuse.
		s.fetchMu.Lock()
		if r, ok := s.fetches[id]; ok {
			r.abandoned = true
		}
		s.fetchMu.Unlock()
		return nil, fmt.Errorf("%s: %w", op, ctx.Err())
	}
}

// ReadPages fetches committed pages from the backup: the lazy-restore
// Source of a memfs (concurrent calls are fine; they are pipelined on the
// connection). off and len(p) must be page aligned.
func (s *Stream) ReadPages(ctx context.Context, off int64, p []byte) error {
	op := fmt.Sprintf("fetch %d bytes at %d of %s", len(p), off, s.cfg.VMID)
	if off < 0 || off%wire.PageSize != 0 || len(p)%wire.PageSize != 0 || off+int64(len(p)) > s.cfg.ImageSize {
		return fmt.Errorf("%s: not page aligned or outside image: %w", op, wire.ErrMalformed)
	}
	for len(p) > 0 {
		n := min(len(p), wire.MaxData)
		if _, err := s.fetch(ctx, op, uint64(off), p[:n], false); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// RestoreState fetches the device-state blob of the backup's restore
// point, as announced when the stream connected.
func (s *Stream) RestoreState(ctx context.Context) ([]byte, error) {
	op := "fetch device state of " + s.cfg.VMID
	s.fetchMu.Lock()
	n := s.restoreState
	s.fetchMu.Unlock()
	if n == 0 {
		return nil, fmt.Errorf("%s: the backup has no restore point", op)
	}
	blob := make([]byte, n)
	for off := uint64(0); off < n; {
		chunk := blob[off:min(n, off+wire.MaxData)]
		got, err := s.fetch(ctx, op, off, chunk, true)
		if err != nil {
			return nil, err
		}
		if len(got) != len(chunk) {
			return nil, fmt.Errorf("%s: %d bytes at %d, expected %d: %w", op, len(got), off, len(chunk), wire.ErrMalformed)
		}
		off += uint64(len(got))
	}
	return blob, nil
}
