package backupclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"hostd/checkpoint/wire"
)

// RestoreConfig describes a read-only restore connection to a backup.
type RestoreConfig struct {
	Addr string      // backup server host:port
	TLS  *tls.Config // from pki.ClientConfig
	VMID string
	// Epoch is the restore point; 0 means the backup's latest.
	Epoch uint64
	// Resume reconnects a restore of Epoch already in progress: the
	// backup sends neither the page map nor the device state, and accepts
	// the epoch as long as it still holds it.
	Resume bool
	// ImageSize, if set, must be the size of the backup's image.
	ImageSize int64
	// DialTimeout bounds connect + handshake + welcome + map; default 10 s.
	DialTimeout time.Duration
	// StallTimeout breaks the connection when requests are outstanding and
	// no complete answer has arrived for this long (a dead or cut-off
	// backup); 0: never. It bounds one answer, not a queue of them, so it
	// holds however many requests are pipelined; the slowest link it
	// tolerates is the largest answer over StallTimeout.
	StallTimeout time.Duration
	Logger       *slog.Logger
}

// RestoreInfo is what the backup announced for the restore.
type RestoreInfo struct {
	Committed uint64 // the backup's last committed epoch
	Epoch     uint64 // the restore point served
	ImageSize int64
	StateLen  int64 // device-state blob (0 on resume)
	StateCRC  uint32
	Pages     int64      // non-zero pages (0 on resume)
	Runs      []wire.Run // the non-zero pages, ascending (nil on resume)
}

// RestoreConn is one read-only restore session: it never begins an epoch
// or disturbs the VM's writer session. Fetches may be issued from many
// goroutines; they are pipelined on the connection and answered in order.
// A RestoreConn does not reconnect: once broken (Err), every call fails
// and the caller dials a new one (with Resume).
type RestoreConn struct {
	cfg  RestoreConfig
	log  *slog.Logger
	conn net.Conn
	info RestoreInfo

	wmu sync.Mutex // orders requests on the wire and in pending
	w   *wire.Writer

	mu      sync.Mutex
	pending []*restoreReq // in request order
	nextID  uint64
	err     error // why the connection broke
	end     chan struct{}
}

type reqKind int

const (
	reqPages reqKind = iota
	reqState
	reqPing
)

type restoreReq struct {
	id        uint64
	kind      reqKind
	off       uint64
	dst       []byte
	sums      []wire.PageSum
	n         int // bytes answered (state)
	done      chan error
	abandoned bool // the caller gave up; drop the answer
}

// DialRestore connects, says RestoreHello and reads the welcome and the
// page map. A backup's refusal comes back as an error wrapping its
// *wire.Error (CodeNotFound: no such VM or restore point).
func DialRestore(ctx context.Context, cfg RestoreConfig) (*RestoreConn, error) {
	op := fmt.Sprintf("open restore of %s epoch %d from %s", cfg.VMID, cfg.Epoch, cfg.Addr)
	if err := wire.ValidVMID(cfg.VMID); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if cfg.Resume && cfg.Epoch == 0 {
		return nil, fmt.Errorf("%s: resume needs the epoch being restored", op)
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	l := cfg.Logger
	if l == nil {
		l = slog.Default()
	}
	dctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	d := tls.Dialer{Config: cfg.TLS}
	c, err := d.DialContext(dctx, "tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	stop := context.AfterFunc(dctx, func() { c.Close() })
	rc := &RestoreConn{cfg: cfg, log: l.With("component", "backupclient", "vm", cfg.VMID, "restore", true), conn: c, w: wire.NewWriter(c), end: make(chan struct{})}
	r := wire.NewReader(c)
	err = rc.hello(r)
	if !stop() {
		err = errors.Join(err, dctx.Err())
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	go rc.read(r)
	return rc, nil
}

func (rc *RestoreConn) hello(r *wire.Reader) error {
	err := rc.w.Write(&wire.RestoreHello{Version: wire.Version, VMID: rc.cfg.VMID, Epoch: rc.cfg.Epoch, Resume: rc.cfg.Resume})
	if err == nil {
		err = rc.w.Flush()
	}
	if err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	m, err := r.Read()
	if err != nil {
		return fmt.Errorf("welcome: %w", err)
	}
	var wm *wire.RestoreWelcome
	switch m := m.(type) {
	case *wire.RestoreWelcome:
		wm = m
	case *wire.Error:
		return fmt.Errorf("backup refused: %w", m)
	default:
		return fmt.Errorf("expected restore welcome, got %s: %w", m.Type(), wire.ErrMalformed)
	}
	if rc.cfg.ImageSize != 0 && int64(wm.ImageSize) != rc.cfg.ImageSize {
		return fmt.Errorf("backup holds an image of %d bytes, expected %d", wm.ImageSize, rc.cfg.ImageSize)
	}
	if rc.cfg.Epoch != 0 && wm.Epoch != rc.cfg.Epoch {
		return fmt.Errorf("backup serves epoch %d, asked %d: %w", wm.Epoch, rc.cfg.Epoch, wire.ErrMalformed)
	}
	if rc.cfg.Resume && (wm.Runs != 0 || wm.StateLen != 0) {
		return fmt.Errorf("backup sends a map on resume: %w", wire.ErrMalformed)
	}
	rc.info = RestoreInfo{Committed: wm.Committed, Epoch: wm.Epoch, ImageSize: int64(wm.ImageSize),
		StateLen: int64(wm.StateLen), StateCRC: wm.StateCRC, Pages: int64(wm.Pages)}
	// The map: runs ascending, disjoint, inside the image, adding up to
	// the announced page count.
	var next, pages uint64
	imgPages := wm.ImageSize / wire.PageSize
	for uint64(len(rc.info.Runs)) < wm.Runs {
		m, err := r.Read()
		if err != nil {
			return fmt.Errorf("page map: %w", err)
		}
		rm, ok := m.(*wire.Runs)
		if !ok {
			return fmt.Errorf("page map: expected runs, got %s: %w", m.Type(), wire.ErrMalformed)
		}
		if uint64(len(rc.info.Runs)+len(rm.Runs)) > wm.Runs {
			return fmt.Errorf("page map: more runs than the %d announced: %w", wm.Runs, wire.ErrMalformed)
		}
		for _, x := range rm.Runs {
			if x.First < next || x.First+uint64(x.Count) > imgPages {
				return fmt.Errorf("page map: run of %d pages at %d out of order or outside the image: %w", x.Count, x.First, wire.ErrMalformed)
			}
			next = x.First + uint64(x.Count)
			pages += uint64(x.Count)
		}
		rc.info.Runs = append(rc.info.Runs, rm.Runs...)
	}
	if pages != wm.Pages {
		return fmt.Errorf("page map holds %d pages, welcome announced %d: %w", pages, wm.Pages, wire.ErrMalformed)
	}
	return nil
}

// Info is what the backup announced.
func (rc *RestoreConn) Info() RestoreInfo { return rc.info }

// Err is why the connection broke (nil while usable).
func (rc *RestoreConn) Err() error {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.err
}

// Close ends the session.
func (rc *RestoreConn) Close() error {
	err := rc.conn.Close()
	<-rc.end
	return err
}

// read is the connection's only reader: it hands each answer to the oldest
// request and fails them all when the connection ends.
func (rc *RestoreConn) read(r *wire.Reader) {
	defer close(rc.end)
	for {
		m, err := r.Read()
		if err == nil {
			err = rc.answer(m)
		}
		if err != nil {
			rc.fail(err)
			return
		}
		rc.mu.Lock()
		rc.armLocked()
		rc.mu.Unlock()
	}
}

// armLocked sets the stall deadline for the next answer: from now while
// requests are outstanding, none while idle.
func (rc *RestoreConn) armLocked() {
	if rc.cfg.StallTimeout <= 0 {
		return
	}
	if len(rc.pending) > 0 {
		rc.conn.SetReadDeadline(time.Now().Add(rc.cfg.StallTimeout))
	} else {
		rc.conn.SetReadDeadline(time.Time{})
	}
}

func (rc *RestoreConn) answer(m wire.Message) error {
	if e, ok := m.(*wire.Error); ok {
		return fmt.Errorf("backup ended the restore session: %w", e)
	}
	rc.mu.Lock()
	if len(rc.pending) == 0 {
		rc.mu.Unlock()
		return fmt.Errorf("backup sent %s nobody asked for: %w", m.Type(), wire.ErrMalformed)
	}
	req := rc.pending[0]
	rc.pending = rc.pending[1:]
	defer rc.mu.Unlock()
	switch m := m.(type) {
	case *wire.RestorePages:
		if req.kind != reqPages || m.ID != req.id || m.Offset != req.off || len(m.Data) != len(req.dst) {
			return fmt.Errorf("backup answered fetch %d (%d bytes at %d) out of turn: %w", m.ID, len(m.Data), m.Offset, wire.ErrMalformed)
		}
		if !req.abandoned {
			copy(req.dst, m.Data)
			copy(req.sums, m.Sums)
		}
	case *wire.Pages:
		if req.kind != reqState || m.ID != req.id || m.Offset != req.off || len(m.Data) > len(req.dst) {
			return fmt.Errorf("backup answered state fetch %d out of turn: %w", m.ID, wire.ErrMalformed)
		}
		if !req.abandoned {
			req.n = copy(req.dst, m.Data)
		}
	case *wire.Pong:
		if req.kind != reqPing || m.ID != req.id {
			return fmt.Errorf("backup answered ping %d out of turn: %w", m.ID, wire.ErrMalformed)
		}
	default:
		return fmt.Errorf("backup sent unexpected %s in a restore session: %w", m.Type(), wire.ErrMalformed)
	}
	req.done <- nil
	return nil
}

func (rc *RestoreConn) fail(err error) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.err == nil {
		rc.err = err
	}
	for _, req := range rc.pending {
		req.done <- rc.err
	}
	rc.pending = nil
	rc.conn.Close()
}

// do sends one request and waits for its answer.
func (rc *RestoreConn) do(ctx context.Context, req *restoreReq, f func(id uint64) wire.Message) error {
	req.done = make(chan error, 1)
	rc.wmu.Lock()
	rc.mu.Lock()
	if rc.err != nil {
		err := rc.err
		rc.mu.Unlock()
		rc.wmu.Unlock()
		return fmt.Errorf("%w: %w", ErrBroken, err)
	}
	rc.nextID++
	req.id = rc.nextID
	rc.pending = append(rc.pending, req)
	if len(rc.pending) == 1 {
		rc.armLocked()
	}
	rc.mu.Unlock()
	// A write blocked on a backup that stopped reading ends with ctx; the
	// frame may be cut, so the connection is done for.
	stop := context.AfterFunc(ctx, func() { rc.conn.SetWriteDeadline(time.Unix(1, 0)) })
	err := rc.w.Write(f(req.id))
	if err == nil {
		err = rc.w.Flush()
	}
	if !stop() {
		rc.conn.SetWriteDeadline(time.Time{})
	}
	rc.wmu.Unlock()
	if err != nil {
		rc.fail(fmt.Errorf("send request: %w", err))
	}
	select {
	case err := <-req.done:
		if err != nil {
			return fmt.Errorf("%w: %w", ErrBroken, err)
		}
		return nil
	case <-ctx.Done():
		rc.mu.Lock()
		req.abandoned = true
		rc.mu.Unlock()
		return ctx.Err()
	}
}

// FetchPages reads committed pages at off into p (page aligned, at most
// wire.MaxData bytes) and the backup's stored sums of each page into sums
// (len(p)/wire.PageSize entries). It does not check the pages against the
// sums: that is the caller's end-to-end check. sequential marks part of a
// sweep (the backup reads ahead) rather than a fault.
func (rc *RestoreConn) FetchPages(ctx context.Context, off int64, p []byte, sums []wire.PageSum, sequential bool) error {
	op := fmt.Sprintf("fetch %d bytes at %d of %s", len(p), off, rc.cfg.VMID)
	if off < 0 || off%wire.PageSize != 0 || len(p) == 0 || len(p)%wire.PageSize != 0 || len(p) > wire.MaxData ||
		off+int64(len(p)) > rc.info.ImageSize || len(sums) != len(p)/wire.PageSize {
		return fmt.Errorf("%s: not page aligned, too large or outside the image: %w", op, wire.ErrMalformed)
	}
	req := &restoreReq{kind: reqPages, off: uint64(off), dst: p, sums: sums}
	err := rc.do(ctx, req, func(id uint64) wire.Message {
		return &wire.Fetch{ID: id, Offset: uint64(off), Length: uint32(len(p)), Sequential: sequential}
	})
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// FetchState reads the restore point's device-state blob and checks it
// against the length and CRC the welcome announced.
func (rc *RestoreConn) FetchState(ctx context.Context) ([]byte, error) {
	op := "fetch device state of " + rc.cfg.VMID
	n := rc.info.StateLen
	if n == 0 {
		return nil, fmt.Errorf("%s: none announced (resumed session?)", op)
	}
	blob := make([]byte, n)
	for off := int64(0); off < n; {
		chunk := blob[off:min(n, off+wire.MaxData)]
		req := &restoreReq{kind: reqState, off: uint64(off), dst: chunk}
		err := rc.do(ctx, req, func(id uint64) wire.Message {
			return &wire.Fetch{ID: id, Offset: uint64(off), Length: uint32(len(chunk)), State: true}
		})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		if req.n != len(chunk) {
			return nil, fmt.Errorf("%s: %d bytes at %d, expected %d: %w", op, req.n, off, len(chunk), wire.ErrMalformed)
		}
		off += int64(req.n)
	}
	if c := wire.Checksum(blob); c != rc.info.StateCRC {
		return nil, fmt.Errorf("%s: blob crc %08x, backup announced %08x", op, c, rc.info.StateCRC)
	}
	return blob, nil
}

// Ping measures one round trip through the backup's session (no disk).
func (rc *RestoreConn) Ping(ctx context.Context) (time.Duration, error) {
	t0 := time.Now()
	err := rc.do(ctx, &restoreReq{kind: reqPing}, func(id uint64) wire.Message { return &wire.Ping{ID: id} })
	if err != nil {
		return 0, fmt.Errorf("ping backup %s: %w", rc.cfg.Addr, err)
	}
	return time.Since(t0), nil
}
