package repo

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"hostd/hostd/accept"
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// Capacity is the memory lent, in bytes (rounded down to PageSize).
	Capacity int64
	// DefaultQuota bounds each client identity (certificate common name)
	// that Quotas does not name; 0 means Capacity.
	DefaultQuota int64
	// Quotas per client identity, in bytes.
	Quotas map[string]int64
	// NoLock skips mlock (tests of many servers on a small machine).
	NoLock bool
	Logger *slog.Logger
	// HandshakeTimeout bounds the TLS handshake and the Hello. Default 10 s.
	HandshakeTimeout time.Duration
	// OrphanTimeout is how long the pages of a session without a
	// connection are kept for it to come back. Default 2 min.
	OrphanTimeout time.Duration
}

// Server is the repository role: it lends Capacity bytes of locked memory
// to clients over mutual TLS.
type Server struct {
	tls  *tls.Config
	opts ServerOptions
	log  *slog.Logger
	inst [16]byte

	mu       sync.Mutex
	arena    *arena
	clients  map[string]*clientState // by certificate common name
	nextID   uint64                  // reclaim request ids
	closed   bool
	lockWarn string
}

type clientState struct {
	name     string
	quota    int64 // pages
	used     int64 // pages
	sessions map[[16]byte]*session
}

type session struct {
	client *clientState
	id     [16]byte

	// mu guards pages and the content of their slots: a slot is only
	// released with mu held, so Get copies under mu.
	mu    sync.Mutex
	pages map[Cap]uint32

	// Guarded by Server.mu.
	conn   *srvConn
	orphan *time.Timer
}

// NewServer allocates the lent memory and makes a server. tlsConf must require
// verified client certificates and TLS 1.3 (pki.ServerConfig does).
func NewServer(tlsConf *tls.Config, opts ServerOptions) (*Server, error) {
	if tlsConf == nil || tlsConf.ClientAuth != tls.RequireAndVerifyClientCert || tlsConf.MinVersion < tls.VersionTLS13 {
		return nil, errors.New("new repo server: tls config must require verified client certificates and TLS 1.3")
	}
	opts.Capacity -= opts.Capacity % PageSize
	if opts.Capacity <= 0 {
		return nil, errors.New("new repo server: capacity must be at least one page")
	}
	if opts.DefaultQuota <= 0 {
		opts.DefaultQuota = opts.Capacity
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.OrphanTimeout <= 0 {
		opts.OrphanTimeout = 2 * time.Minute
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	s := &Server{tls: tlsConf, opts: opts, log: l.With("component", "repo"), clients: map[string]*clientState{}}
	rand.Read(s.inst[:])
	a, lockErr, err := newArena(opts.Capacity, !opts.NoLock)
	if err != nil {
		return nil, fmt.Errorf("new repo server: %w", err)
	}
	if lockErr != nil {
		s.lockWarn = lockErr.Error()
		s.log.Warn("repository memory is not locked: lent pages may be swapped out", "err", lockErr)
	}
	s.arena = a
	return s, nil
}

// Close releases the lent memory. Call it after Serve has returned.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, c := range s.clients {
		for _, ss := range c.sessions {
			if ss.orphan != nil {
				ss.orphan.Stop()
			}
		}
	}
	return s.arena.close()
}

// Serve accepts connections on ln until ctx ends, then closes ln and every
// connection and returns ctx's error.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	return accept.Serve(ctx, ln, "repo", s.serveConn)
}

// Status is a repository's state.
type Status struct {
	Capacity int64 `json:"capacity"`
	Used     int64 `json:"used"`
	Locked   bool  `json:"locked"`
	// LockError says why the memory is not locked.
	LockError string  `json:"lock_error,omitempty"`
	Clients   []Usage `json:"clients"`
}

// Usage is one client identity's use of a repository.
type Usage struct {
	Name      string `json:"name"`
	Used      int64  `json:"used"`
	Quota     int64  `json:"quota"`
	Sessions  int    `json:"sessions"`
	Connected int    `json:"connected"`
}

// Status reports capacity and use, per client in name order.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Capacity: s.opts.Capacity, Locked: s.arena.locked, LockError: s.lockWarn}
	for _, c := range s.clients {
		cs := Usage{Name: c.name, Used: c.used * PageSize, Quota: c.quota * PageSize, Sessions: len(c.sessions)}
		for _, ss := range c.sessions {
			if ss.conn != nil {
				cs.Connected++
			}
		}
		st.Used += cs.Used
		st.Clients = append(st.Clients, cs)
	}
	sort.Slice(st.Clients, func(i, j int) bool { return st.Clients[i].Name < st.Clients[j].Name })
	return st
}

// Reclaim asks the named client to give back bytes of its pages (it moves
// them to its own disk) and waits for its answers. It returns the bytes
// the client reports freed. Sessions are asked in order of use, largest
// first, each for what remains to be freed.
func (s *Server) Reclaim(ctx context.Context, client string, bytes int64) (int64, error) {
	s.mu.Lock()
	c := s.clients[client]
	var conns []*srvConn
	if c != nil {
		for _, ss := range c.sessions {
			if ss.conn != nil {
				conns = append(conns, ss.conn)
			}
		}
	}
	s.mu.Unlock()
	uses := make([]int64, len(conns))
	for i, sc := range conns { // session locks only without s.mu (lock order: session, then server)
		sc.sess.mu.Lock()
		uses[i] = int64(len(sc.sess.pages)) * PageSize
		sc.sess.mu.Unlock()
	}
	if len(conns) == 0 {
		return 0, fmt.Errorf("repo reclaim from %q: no connected session", client)
	}
	sort.Sort(byUse{conns, uses})
	var freed int64
	for i, sc := range conns {
		if freed >= bytes {
			break
		}
		ask := min(bytes-freed, uses[i])
		if ask <= 0 {
			continue
		}
		n, err := sc.reclaim(ctx, uint64(ask))
		freed += int64(n)
		if err != nil {
			return freed, fmt.Errorf("repo reclaim from %q: %w", client, err)
		}
	}
	return freed, nil
}

type byUse struct {
	c []*srvConn
	u []int64
}

func (b byUse) Len() int           { return len(b.c) }
func (b byUse) Less(i, j int) bool { return b.u[i] > b.u[j] }
func (b byUse) Swap(i, j int) {
	b.c[i], b.c[j] = b.c[j], b.c[i]
	b.u[i], b.u[j] = b.u[j], b.u[i]
}

// srvConn is one client connection.
type srvConn struct {
	s    *Server
	conn *tls.Conn
	log  *slog.Logger
	sess *session

	frameWriter

	rmu      sync.Mutex
	reclaims map[uint64]chan uint64
}

func (s *Server) serveConn(ctx context.Context, raw net.Conn) {
	defer raw.Close()
	log := s.log.With("remote", raw.RemoteAddr().String())
	conn := tls.Server(raw, s.tls)
	hctx, hcancel := context.WithTimeout(ctx, s.opts.HandshakeTimeout)
	defer hcancel()
	if err := conn.HandshakeContext(hctx); err != nil {
		log.Warn("rejected peer: tls handshake", "err", err)
		return
	}
	name := conn.ConnectionState().PeerCertificates[0].Subject.CommonName
	log = log.With("client", name)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	sc := &srvConn{s: s, conn: conn, log: log, frameWriter: frameWriter{w: bufio.NewWriterSize(conn, 64<<10)}, reclaims: map[uint64]chan uint64{}}
	r := bufio.NewReaderSize(conn, 64<<10)
	conn.SetReadDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	m, err := ReadFrame(r)
	if err != nil {
		log.Warn("rejected peer: reading hello", "err", err)
		sc.fatal(CodeMalformed, "read hello: "+err.Error())
		return
	}
	hello, ok := m.(*Hello)
	if !ok {
		sc.fatal(CodeProtocol, fmt.Sprintf("expected hello, got type %d", m.Type()))
		return
	}
	if hello.Version != Version {
		sc.fatal(CodeProtocol, fmt.Sprintf("protocol version %d, server speaks %d", hello.Version, Version))
		return
	}
	conn.SetReadDeadline(time.Time{})
	sess, welcome := s.attach(name, hello.Session, sc)
	if sess == nil {
		sc.fatal(CodeShutdown, "repository is shutting down")
		return
	}
	defer s.detach(sess, sc)
	if err := sc.send(welcome); err != nil {
		return
	}
	log.Info("client connected", "used", welcome.Used, "available", welcome.Available)
	err = sc.loop(r)
	switch {
	case errors.Is(err, io.EOF), ctx.Err() != nil:
		log.Info("client disconnected")
	default:
		log.Warn("client connection failed", "err", err)
		code := CodeInternal
		if errors.Is(err, ErrMalformed) {
			code = CodeMalformed
		}
		sc.fatal(code, err.Error())
	}
	sc.failReclaims()
}

// attach binds a connection to its session, taking over from an older
// connection of the same session (a client only reconnects when it
// believes the old one dead).
func (s *Server) attach(name string, id [16]byte, sc *srvConn) (*session, *Welcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, nil
	}
	c := s.clients[name]
	if c == nil {
		q, ok := s.opts.Quotas[name]
		if !ok {
			q = s.opts.DefaultQuota
		}
		c = &clientState{name: name, quota: q / PageSize, sessions: map[[16]byte]*session{}}
		s.clients[name] = c
	}
	ss := c.sessions[id]
	if ss == nil {
		ss = &session{client: c, id: id, pages: map[Cap]uint32{}}
		c.sessions[id] = ss
	}
	if ss.orphan != nil {
		ss.orphan.Stop()
		ss.orphan = nil
	}
	if old := ss.conn; old != nil {
		s.log.Info("new connection takes over session", "client", name)
		old.conn.Close()
	}
	sc.sess = ss
	ss.conn = sc
	return ss, &Welcome{Version: Version, Instance: s.inst, Quota: uint64(c.quota * PageSize), Used: uint64(c.used * PageSize), Available: uint64(s.availableLocked(c) * PageSize)}
}

// detach unbinds a connection; its session's pages wait OrphanTimeout for
// a reconnection, then are freed.
func (s *Server) detach(ss *session, sc *srvConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss.conn != sc {
		return // taken over
	}
	ss.conn = nil
	if s.closed {
		return
	}
	ss.orphan = time.AfterFunc(s.opts.OrphanTimeout, func() { s.reap(ss) })
}

func (s *Server) reap(ss *session) {
	s.mu.Lock()
	if ss.conn != nil || s.closed || ss.client.sessions[ss.id] != ss {
		s.mu.Unlock()
		return
	}
	delete(ss.client.sessions, ss.id)
	if len(ss.client.sessions) == 0 && ss.client.used == 0 {
		delete(s.clients, ss.client.name)
	}
	s.mu.Unlock()
	ss.mu.Lock()
	slots := make([]uint32, 0, len(ss.pages))
	for _, sl := range ss.pages {
		slots = append(slots, sl)
	}
	clear(ss.pages)
	s.mu.Lock()
	s.arena.release(slots)
	ss.client.used -= int64(len(slots))
	if len(ss.client.sessions) == 0 && ss.client.used == 0 {
		delete(s.clients, ss.client.name)
	}
	s.mu.Unlock()
	ss.mu.Unlock()
	s.log.Info("freed the pages of a session that did not come back", "client", ss.client.name, "pages", len(slots))
}

func (s *Server) availableLocked(c *clientState) int64 {
	return max(0, min(c.quota-c.used, int64(len(s.arena.free))))
}

// loop serves requests in order until the connection ends.
func (sc *srvConn) loop(r *bufio.Reader) error {
	for {
		m, err := ReadFrame(r)
		if err != nil {
			return err
		}
		var reply Message
		switch m := m.(type) {
		case *Put:
			reply = sc.put(m)
		case *Get:
			reply = sc.get(m)
		case *Free:
			reply = sc.free(m)
		case *Reclaimed:
			sc.rmu.Lock()
			ch := sc.reclaims[m.ID]
			delete(sc.reclaims, m.ID)
			sc.rmu.Unlock()
			if ch == nil {
				return fmt.Errorf("%w: reclaimed answers unknown request %d", ErrMalformed, m.ID)
			}
			ch <- m.Bytes
			continue
		default:
			return fmt.Errorf("%w: unexpected %T from client", ErrMalformed, m)
		}
		if err := sc.send(reply); err != nil {
			return err
		}
	}
}

func (sc *srvConn) put(m *Put) Message {
	s, ss := sc.s, sc.sess
	n := len(m.Data) / PageSize
	s.mu.Lock()
	c := ss.client
	if c.used+int64(n) > c.quota {
		s.mu.Unlock()
		return &Error{ID: m.ID, Code: CodeQuota, Message: fmt.Sprintf("quota of %d bytes for %s used up", c.quota*PageSize, c.name)}
	}
	slots := s.arena.alloc(n)
	if slots == nil {
		s.mu.Unlock()
		return &Error{ID: m.ID, Code: CodeFull, Message: "repository memory is full"}
	}
	c.used += int64(n)
	s.mu.Unlock()

	for i, sl := range slots {
		copy(s.arena.slot(sl), m.Data[i*PageSize:])
	}
	caps := make([]Cap, n)
	raw := make([]byte, 16*n)
	rand.Read(raw)
	ss.mu.Lock()
	for i := range caps {
		copy(caps[i][:], raw[16*i:])
		ss.pages[caps[i]] = slots[i]
	}
	ss.mu.Unlock()
	s.mu.Lock()
	avail := s.availableLocked(c)
	s.mu.Unlock()
	return &Stored{ID: m.ID, Available: uint64(avail * PageSize), Caps: caps}
}

func (sc *srvConn) get(m *Get) Message {
	s, ss := sc.s, sc.sess
	d := &Data{ID: m.ID, Present: make([]bool, len(m.Caps))}
	ss.mu.Lock()
	for i, c := range m.Caps {
		if sl, ok := ss.pages[c]; ok {
			d.Present[i] = true
			d.Data = append(d.Data, s.arena.slot(sl)...)
		}
	}
	ss.mu.Unlock()
	return d
}

func (sc *srvConn) free(m *Free) Message {
	s, ss := sc.s, sc.sess
	var slots []uint32
	ss.mu.Lock()
	for _, c := range m.Caps {
		if sl, ok := ss.pages[c]; ok {
			slots = append(slots, sl)
			delete(ss.pages, c)
		}
	}
	s.mu.Lock()
	s.arena.release(slots)
	ss.client.used -= int64(len(slots))
	avail := s.availableLocked(ss.client)
	s.mu.Unlock()
	ss.mu.Unlock()
	return &Freed{ID: m.ID, Available: uint64(avail * PageSize), N: uint16(len(slots))}
}

// fatal tells the client why the connection ends, and lets it read that
// before the close (closing with its frames unread would reset instead).
func (sc *srvConn) fatal(code ErrorCode, msg string) {
	if len(msg) > maxMessage {
		msg = msg[:maxMessage]
	}
	sc.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	if sc.send(&Error{Code: code, Message: msg}) != nil {
		return
	}
	sc.conn.CloseWrite()
	sc.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	io.Copy(io.Discard, sc.conn)
}

func (sc *srvConn) reclaim(ctx context.Context, bytes uint64) (uint64, error) {
	sc.s.mu.Lock()
	sc.s.nextID++
	id := sc.s.nextID
	sc.s.mu.Unlock()
	ch := make(chan uint64, 1)
	sc.rmu.Lock()
	if sc.reclaims == nil {
		sc.rmu.Unlock()
		return 0, errors.New("connection closed")
	}
	sc.reclaims[id] = ch
	sc.rmu.Unlock()
	if err := sc.send(&Reclaim{ID: id, Bytes: bytes}); err != nil {
		return 0, fmt.Errorf("send reclaim: %w", err)
	}
	select {
	case n, ok := <-ch:
		if !ok {
			return 0, errors.New("connection closed before the client answered")
		}
		return n, nil
	case <-ctx.Done():
		sc.rmu.Lock()
		delete(sc.reclaims, id)
		sc.rmu.Unlock()
		return 0, ctx.Err()
	}
}

func (sc *srvConn) failReclaims() {
	sc.rmu.Lock()
	defer sc.rmu.Unlock()
	for _, ch := range sc.reclaims {
		close(ch)
	}
	sc.reclaims = nil
}
