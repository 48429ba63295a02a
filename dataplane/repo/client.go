package repo

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Errors a Client's calls wrap.
var (
	// ErrUnavailable: no connection to the repository right now (it is
	// down or being redialled); the caller falls back to its disk.
	ErrUnavailable = errors.New("repository unavailable")
	// ErrFull: the quota or the repository's memory is used up.
	ErrFull = errors.New("repository full")
	// ErrClosed: the Client was closed.
	ErrClosed = errors.New("repository client closed")
)

// ClientConfig says how a Client reaches a repository.
type ClientConfig struct {
	// Addr is host:port of the repository.
	Addr string
	// TLS is the client's mutual TLS config (pki.ClientConfig).
	TLS *tls.Config
	// Session names this client's pages on the server; zero means a
	// random one. Pages survive reconnections of the same Client.
	Session [16]byte
	// OnReclaim is called (on its own goroutine) when the repository asks
	// for bytes back. It must move pages to local storage, Free them, and
	// return the bytes freed. Nil answers 0.
	OnReclaim func(ctx context.Context, bytes int64) int64
	Logger    *slog.Logger
	// DialTimeout bounds one connection attempt (TCP + TLS + Hello);
	// default 5 s.
	DialTimeout time.Duration
	// RetryMin and RetryMax bound the backoff between connection
	// attempts; defaults 200 ms and 5 s.
	RetryMin, RetryMax time.Duration
}

// Client is one session with one repository. It connects in the
// background and reconnects after failures; calls made while it is not
// connected fail at once with ErrUnavailable. Calls are safe for
// concurrent use and are pipelined on the connection.
type Client struct {
	cfg ClientConfig
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu        sync.Mutex
	cc        *clientConn // nil while disconnected
	connected chan struct{}
	instance  [16]byte
	lastErr   string

	available atomic.Int64
	stored    atomic.Int64 // pages this client holds on the server, as it counts them
	nextID    atomic.Uint64

	// Counters for status.
	puts, gets, frees, failures, reconnects atomic.Uint64
}

type clientConn struct {
	conn *tls.Conn
	frameWriter

	mu      sync.Mutex
	waiting map[uint64]chan Message
	err     error
}

// NewClient starts a client that connects in the background.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Addr == "" || cfg.TLS == nil {
		return nil, errors.New("new repo client: need an address and a TLS config")
	}
	if cfg.Session == ([16]byte{}) {
		rand.Read(cfg.Session[:])
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 200 * time.Millisecond
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(5*time.Second, cfg.RetryMin)
	}
	l := cfg.Logger
	if l == nil {
		l = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{cfg: cfg, log: l.With("component", "repo-client", "repo", cfg.Addr), ctx: ctx, cancel: cancel, done: make(chan struct{}), connected: make(chan struct{})}
	go c.run()
	return c, nil
}

// Dial is NewClient followed by WaitConnected: for callers that want the first
// connection (or its error) before going on.
func Dial(ctx context.Context, cfg ClientConfig) (*Client, error) {
	c, err := NewClient(cfg)
	if err != nil {
		return nil, err
	}
	if err := c.WaitConnected(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// WaitConnected waits until the client is connected.
func (c *Client) WaitConnected(ctx context.Context) error {
	for {
		c.mu.Lock()
		ok, ch, last := c.cc != nil, c.connected, c.lastErr
		c.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("connect to repository %s: %w (last error: %s)", c.cfg.Addr, ctx.Err(), last)
		case <-c.done:
			return ErrClosed
		}
	}
}

// Close ends the session's connection. The server keeps the pages for its
// orphan timeout; Free them first to release them at once.
func (c *Client) Close() error {
	c.cancel()
	<-c.done
	return nil
}

// run keeps a connection up until Close.
func (c *Client) run() {
	defer close(c.done)
	backoff := c.cfg.RetryMin
	for c.ctx.Err() == nil {
		cc, r, w, err := c.dial()
		if err != nil {
			c.mu.Lock()
			c.lastErr = err.Error()
			c.mu.Unlock()
			c.failures.Add(1)
			c.log.Debug("repository connection failed", "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-c.ctx.Done():
			}
			backoff = min(2*backoff, c.cfg.RetryMax)
			continue
		}
		backoff = c.cfg.RetryMin
		c.mu.Lock()
		if w.Instance != c.instance {
			if c.instance != ([16]byte{}) {
				c.log.Warn("repository restarted: the pages stored there are gone")
			}
			c.instance = w.Instance
			c.stored.Store(0)
		}
		c.available.Store(int64(w.Available))
		c.cc = cc
		close(c.connected)
		c.connected = make(chan struct{})
		c.lastErr = ""
		c.mu.Unlock()
		c.reconnects.Add(1)
		c.log.Info("connected to repository", "available", w.Available)

		err = c.readLoop(cc, r)

		c.mu.Lock()
		c.cc = nil
		if c.ctx.Err() == nil {
			c.lastErr = err.Error()
		}
		c.mu.Unlock()
		cc.fail(err)
		if c.ctx.Err() == nil {
			c.log.Warn("repository connection lost", "err", err)
		}
	}
}

func (c *Client) dial() (*clientConn, *bufio.Reader, *Welcome, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.DialTimeout)
	defer cancel()
	d := tls.Dialer{Config: c.cfg.TLS}
	raw, err := d.DialContext(ctx, "tcp", c.cfg.Addr)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("dial repository %s: %w", c.cfg.Addr, err)
	}
	conn := raw.(*tls.Conn)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	cc := &clientConn{conn: conn, frameWriter: frameWriter{w: bufio.NewWriterSize(conn, 64<<10)}, waiting: map[uint64]chan Message{}}
	if err := cc.send(&Hello{Version: Version, Session: c.cfg.Session}); err != nil {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("repository %s: send hello: %w", c.cfg.Addr, err)
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	m, err := ReadFrame(r)
	if err != nil {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("repository %s: read welcome: %w", c.cfg.Addr, err)
	}
	w, ok := m.(*Welcome)
	if !ok {
		conn.Close()
		if e, ok := m.(*Error); ok {
			return nil, nil, nil, fmt.Errorf("repository %s refused the session: %w", c.cfg.Addr, e)
		}
		return nil, nil, nil, fmt.Errorf("repository %s: expected welcome, got type %d", c.cfg.Addr, m.Type())
	}
	if w.Version != Version {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("repository %s speaks version %d, not %d", c.cfg.Addr, w.Version, Version)
	}
	return cc, r, w, nil
}

func (c *Client) readLoop(cc *clientConn, r *bufio.Reader) error {
	stop := context.AfterFunc(c.ctx, func() { cc.conn.Close() })
	defer stop()
	for {
		m, err := ReadFrame(r)
		if err != nil {
			return err
		}
		var id uint64
		switch m := m.(type) {
		case *Stored:
			id = m.ID
			c.available.Store(int64(m.Available))
		case *Data:
			id = m.ID
		case *Freed:
			id = m.ID
			c.available.Store(int64(m.Available))
		case *Error:
			if m.ID == 0 {
				return fmt.Errorf("repository ended the connection: %w", m)
			}
			id = m.ID
		case *Reclaim:
			go c.reclaim(cc, m)
			continue
		default:
			return fmt.Errorf("%w: unexpected %T from repository", ErrMalformed, m)
		}
		cc.mu.Lock()
		ch := cc.waiting[id]
		delete(cc.waiting, id)
		cc.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
}

func (c *Client) reclaim(cc *clientConn, m *Reclaim) {
	var freed int64
	if c.cfg.OnReclaim != nil {
		freed = c.cfg.OnReclaim(c.ctx, int64(m.Bytes))
	}
	c.log.Info("repository reclaimed memory", "asked", m.Bytes, "freed", freed)
	if err := cc.send(&Reclaimed{ID: m.ID, Bytes: uint64(max(freed, 0))}); err != nil {
		c.log.Warn("answer reclaim", "err", err)
	}
}

func (cc *clientConn) fail(err error) {
	cc.conn.Close()
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.err == nil {
		cc.err = err
	}
	for id, ch := range cc.waiting {
		close(ch)
		delete(cc.waiting, id)
	}
}

// call sends a request and waits for its answer.
func (c *Client) call(ctx context.Context, id uint64, m Message) (Message, error) {
	c.mu.Lock()
	cc := c.cc
	c.mu.Unlock()
	if cc == nil {
		if c.ctx.Err() != nil {
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("repository %s: %w", c.cfg.Addr, ErrUnavailable)
	}
	ch := make(chan Message, 1)
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		return nil, fmt.Errorf("repository %s: %w", c.cfg.Addr, ErrUnavailable)
	}
	cc.waiting[id] = ch
	cc.mu.Unlock()
	if err := cc.send(m); err != nil {
		cc.conn.Close() // the read loop notices and fails every call
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return nil, fmt.Errorf("repository %s: connection lost: %w", c.cfg.Addr, ErrUnavailable)
		}
		if e, ok := r.(*Error); ok {
			if e.Code == CodeQuota || e.Code == CodeFull {
				return nil, fmt.Errorf("repository %s: %w: %s", c.cfg.Addr, ErrFull, e.Message)
			}
			return nil, fmt.Errorf("repository %s: %w", c.cfg.Addr, e)
		}
		return r, nil
	case <-ctx.Done():
		cc.mu.Lock()
		delete(cc.waiting, id)
		cc.mu.Unlock()
		return nil, ctx.Err()
	}
}

// Put stores data (a multiple of PageSize) and returns one capability per
// page. More than MaxPages pages go as several pipelined frames; if any
// fails, the pages that were stored are freed and the error returned.
func (c *Client) Put(ctx context.Context, data []byte) ([]Cap, error) {
	if len(data) == 0 || len(data)%PageSize != 0 {
		return nil, fmt.Errorf("repo put: %d bytes is not a positive multiple of %d", len(data), PageSize)
	}
	n := len(data) / PageSize
	caps := make([]Cap, n)
	err := c.chunked(ctx, n, func(ctx context.Context, lo, hi int) error {
		id := c.nextID.Add(1)
		r, err := c.call(ctx, id, &Put{ID: id, Data: data[lo*PageSize : hi*PageSize]})
		if err != nil {
			return err
		}
		s, ok := r.(*Stored)
		if !ok || len(s.Caps) != hi-lo {
			return fmt.Errorf("repository %s: %w: bad answer to put", c.cfg.Addr, ErrMalformed)
		}
		copy(caps[lo:], s.Caps)
		c.stored.Add(int64(hi - lo))
		return nil
	})
	c.puts.Add(1)
	if err != nil {
		var got []Cap
		for _, cp := range caps {
			if cp != (Cap{}) {
				got = append(got, cp)
			}
		}
		if len(got) > 0 {
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			c.Free(fctx, got)
			cancel()
		}
		return nil, fmt.Errorf("repo put: %w", err)
	}
	return caps, nil
}

// Get reads the pages of caps into dst (len(caps)*PageSize bytes).
// present[i] says whether caps[i] was found; a missing page (reclaimed,
// or the repository restarted) leaves its part of dst untouched.
func (c *Client) Get(ctx context.Context, caps []Cap, dst []byte) (present []bool, err error) {
	if len(dst) != len(caps)*PageSize {
		return nil, fmt.Errorf("repo get: %d bytes for %d pages", len(dst), len(caps))
	}
	present = make([]bool, len(caps))
	err = c.chunked(ctx, len(caps), func(ctx context.Context, lo, hi int) error {
		id := c.nextID.Add(1)
		r, err := c.call(ctx, id, &Get{ID: id, Caps: caps[lo:hi]})
		if err != nil {
			return err
		}
		d, ok := r.(*Data)
		if !ok || len(d.Present) != hi-lo {
			return fmt.Errorf("repository %s: %w: bad answer to get", c.cfg.Addr, ErrMalformed)
		}
		src := d.Data
		for i, p := range d.Present {
			if p {
				copy(dst[(lo+i)*PageSize:(lo+i+1)*PageSize], src[:PageSize])
				src = src[PageSize:]
				present[lo+i] = true
			}
		}
		return nil
	})
	c.gets.Add(1)
	if err != nil {
		return nil, fmt.Errorf("repo get: %w", err)
	}
	return present, nil
}

// Free releases pages and returns how many the server found.
func (c *Client) Free(ctx context.Context, caps []Cap) (int, error) {
	if len(caps) == 0 {
		return 0, nil
	}
	var freed atomic.Int64
	err := c.chunked(ctx, len(caps), func(ctx context.Context, lo, hi int) error {
		id := c.nextID.Add(1)
		r, err := c.call(ctx, id, &Free{ID: id, Caps: caps[lo:hi]})
		if err != nil {
			return err
		}
		f, ok := r.(*Freed)
		if !ok {
			return fmt.Errorf("repository %s: %w: bad answer to free", c.cfg.Addr, ErrMalformed)
		}
		freed.Add(int64(f.N))
		c.stored.Add(-int64(f.N))
		return nil
	})
	c.frees.Add(1)
	if err != nil {
		return int(freed.Load()), fmt.Errorf("repo free: %w", err)
	}
	return int(freed.Load()), nil
}

// chunked runs f on [lo, hi) ranges of at most MaxPages, concurrently,
// and returns the first error.
func (c *Client) chunked(ctx context.Context, n int, f func(ctx context.Context, lo, hi int) error) error {
	if n <= MaxPages {
		return f(ctx, 0, n)
	}
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for lo := 0; lo < n; lo += MaxPages {
		hi := min(lo+MaxPages, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx, lo, hi); err != nil {
				once.Do(func() { first = err })
			}
		}()
	}
	wg.Wait()
	return first
}

// LinkStatus is a client's view of its repository.
type LinkStatus struct {
	Addr      string `json:"addr"`
	Connected bool   `json:"connected"`
	// Available is what the repository last said this client may still
	// store, in bytes.
	Available int64 `json:"available"`
	// Stored is the bytes this session holds there.
	Stored     int64  `json:"stored"`
	Puts       uint64 `json:"puts"`
	Gets       uint64 `json:"gets"`
	Frees      uint64 `json:"frees"`
	Failures   uint64 `json:"connect_failures"`
	Reconnects uint64 `json:"connects"`
	LastError  string `json:"last_error,omitempty"`
}

// Status reports the connection and counters.
func (c *Client) Status() LinkStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	return LinkStatus{
		Addr: c.cfg.Addr, Connected: c.cc != nil, Available: c.available.Load(), Stored: c.stored.Load() * PageSize,
		Puts: c.puts.Load(), Gets: c.gets.Load(), Frees: c.frees.Load(), Failures: c.failures.Load(), Reconnects: c.reconnects.Load(),
		LastError: c.lastErr,
	}
}

// Connected says whether calls can currently reach the repository.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cc != nil
}

// Available is the bytes the repository last said this client may store.
func (c *Client) Available() int64 { return c.available.Load() }

// Instance identifies the repository process last connected to; it
// changes when the repository restarts (and its pages are gone).
func (c *Client) Instance() [16]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.instance
}

// Addr is the repository's address.
func (c *Client) Addr() string { return c.cfg.Addr }
