package backup

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/wire"
	"hostd/hostd/accept"
)

// Server serves page streams into a store.
type Server struct {
	store *backupstore.Store
	tls   *tls.Config
	log   *slog.Logger
	hsTO  time.Duration
	max   uint64
	fair  *fairShare
	quant int

	mu       sync.Mutex
	sessions map[string]*session // by VM id
}

// Options tune a Server.
type Options struct {
	Logger *slog.Logger
	// HandshakeTimeout bounds the TLS handshake and the Hello; a peer that
	// connects and says nothing is dropped. Default 10 s.
	HandshakeTimeout time.Duration
	// MaxImageSize bounds the guest RAM a peer may announce; the store
	// sizes its checksum table from it. Default 1 TiB.
	MaxImageSize uint64
	// RestoreReaders is how many image reads restore sessions may have
	// in flight together, handed out in turn (fair shares); default 2.
	RestoreReaders int
	// RestoreQuantum is the size of one turn: restore reads are cut into
	// pieces of at most this many bytes (a multiple of 4096); default
	// 256 KiB.
	RestoreQuantum int
}

// New makes a server. tlsConf must require and verify client certificates
// (pki.ServerConfig does); New refuses a config that does not.
func New(store *backupstore.Store, tlsConf *tls.Config, opts Options) (*Server, error) {
	if tlsConf == nil || tlsConf.ClientAuth != tls.RequireAndVerifyClientCert || tlsConf.MinVersion < tls.VersionTLS13 {
		return nil, errors.New("new backup server: tls config must require verified client certificates and TLS 1.3")
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	to := opts.HandshakeTimeout
	if to == 0 {
		to = 10 * time.Second
	}
	maxImg := opts.MaxImageSize
	if maxImg == 0 {
		maxImg = 1 << 40
	}
	readers := opts.RestoreReaders
	if readers <= 0 {
		readers = 2
	}
	quant := opts.RestoreQuantum
	if quant <= 0 {
		quant = 256 << 10
	}
	if quant%wire.PageSize != 0 {
		return nil, fmt.Errorf("new backup server: restore quantum %d not a multiple of %d", quant, wire.PageSize)
	}
	return &Server{store: store, tls: tlsConf, log: l.With("component", "backup"), hsTO: to, max: maxImg,
		fair: newFairShare(readers), quant: quant, sessions: map[string]*session{}}, nil
}

// Serve accepts connections on ln until ctx ends, then closes ln and every
// session and returns ctx's error.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	return accept.Serve(ctx, ln, "backup", s.serveConn)
}

type session struct {
	vm   string
	conn net.Conn
	done chan struct{}
}

func (s *Server) serveConn(ctx context.Context, raw net.Conn) {
	defer raw.Close()
	log := s.log.With("remote", raw.RemoteAddr().String())
	conn := tls.Server(raw, s.tls)
	hctx, hcancel := context.WithTimeout(ctx, s.hsTO)
	defer hcancel()
	if err := conn.HandshakeContext(hctx); err != nil {
		log.Warn("rejected peer: tls handshake", "err", err)
		return
	}
	peer := conn.ConnectionState().PeerCertificates[0].Subject.CommonName
	log = log.With("peer", peer)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	r, w := wire.NewReader(conn), wire.NewWriter(conn)
	conn.SetReadDeadline(time.Now().Add(s.hsTO))
	m, err := r.Read()
	if err != nil {
		log.Warn("rejected peer: reading hello", "err", err)
		s.sendError(w, codeOf(err), "read hello: "+err.Error())
		return
	}
	if rh, ok := m.(*wire.RestoreHello); ok {
		conn.SetReadDeadline(time.Time{})
		s.serveRestore(ctx, log, conn, rh, r, w)
		return
	}
	hello, ok := m.(*wire.Hello)
	if !ok {
		s.sendError(w, wire.CodeProtocol, fmt.Sprintf("expected hello, got %s", m.Type()))
		log.Warn("rejected peer: no hello", "got", m.Type())
		return
	}
	conn.SetReadDeadline(time.Time{})
	if hello.Version != wire.Version {
		s.sendError(w, wire.CodeProtocol, fmt.Sprintf("protocol version %d, server speaks %d", hello.Version, wire.Version))
		return
	}
	if hello.ImageSize > s.max {
		log.Warn("rejected peer: image too large", "size", hello.ImageSize)
		s.sendError(w, wire.CodeProtocol, fmt.Sprintf("image of %d bytes exceeds this server's limit of %d", hello.ImageSize, s.max))
		return
	}
	log = log.With("vm", hello.VMID)
	sess := &session{vm: hello.VMID, conn: conn, done: make(chan struct{})}
	defer close(sess.done)
	if err := s.takeOver(ctx, sess); err != nil {
		s.sendError(w, wire.CodeBusy, err.Error())
		return
	}
	defer s.release(sess)

	err = s.session(ctx, log, peer, hello, r, w)
	switch {
	case err == nil, errors.Is(err, io.EOF):
		log.Info("session ended")
	case ctx.Err() != nil:
		log.Info("session closed by shutdown")
	default:
		log.Warn("session failed", "err", err)
		s.sendError(w, codeOf(err), err.Error())
		linger(conn)
	}
}

// linger lets the peer read our Error frame: closing with its frames still
// unread would reset the connection, and a host mid-send would see only
// "connection reset" instead of why. So: half-close, then discard what it
// still sends, for a bounded time.
func linger(conn *tls.Conn) {
	conn.CloseWrite()
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	io.Copy(io.Discard, conn)
}

// takeOver registers sess as the VM's session, closing and waiting for a
// previous one: the newest connection of a VM wins, because a host only
// reconnects when it believes the old connection dead.
func (s *Server) takeOver(ctx context.Context, sess *session) error {
	s.mu.Lock()
	old := s.sessions[sess.vm]
	s.sessions[sess.vm] = sess
	s.mu.Unlock()
	if old == nil {
		return nil
	}
	s.log.Info("new session takes over vm", "vm", sess.vm)
	old.conn.Close()
	select {
	case <-old.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("take over vm %s: %w", sess.vm, ctx.Err())
	case <-time.After(30 * time.Second):
		return fmt.Errorf("take over vm %s: previous session does not end", sess.vm)
	}
}

func (s *Server) release(sess *session) {
	s.mu.Lock()
	if s.sessions[sess.vm] == sess {
		delete(s.sessions, sess.vm)
	}
	s.mu.Unlock()
}

// protoError is a well-formed frame the session did not expect.
type protoError struct {
	code wire.ErrorCode
	msg  string
}

func (e *protoError) Error() string { return e.msg }

func codeOf(err error) wire.ErrorCode {
	var pe *protoError
	switch {
	case errors.As(err, &pe):
		return pe.code
	case errors.Is(err, wire.ErrMalformed):
		return wire.CodeMalformed
	case errors.Is(err, syscall.ENOSPC):
		return wire.CodeNoSpace
	case errors.Is(err, backupstore.ErrEpoch):
		return wire.CodeEpoch
	case errors.Is(err, backupstore.ErrRange), errors.Is(err, backupstore.ErrNotFound):
		return wire.CodeProtocol
	}
	return wire.CodeInternal
}

func (s *Server) sendError(w *wire.Writer, code wire.ErrorCode, msg string) {
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	if w.Write(&wire.Error{Code: code, Message: msg}) == nil {
		w.Flush()
	}
}

// session runs one VM's stream after Hello.
func (s *Server) session(ctx context.Context, log *slog.Logger, peer string, hello *wire.Hello, r *wire.Reader, w *wire.Writer) error {
	vm, err := s.store.VM(hello.VMID, int64(hello.ImageSize), true)
	if err != nil {
		return fmt.Errorf("session %s: %w", hello.VMID, err)
	}
	committed := vm.CommittedEpoch()
	ep, err := vm.Begin(committed+1, true)
	if err != nil {
		return fmt.Errorf("session %s: %w", hello.VMID, err)
	}
	defer func() { ep.Abort() }()
	welcome := &wire.Welcome{Committed: committed, ImageSize: uint64(vm.Size())}
	if m := vm.Committed(); m != nil && m.StateEpoch != 0 {
		welcome.StateLen = uint64(m.StateLen)
	}
	if err := w.Write(welcome); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	log.Info("session open", "committed", committed, "client_epoch", hello.Epoch)
	for {
		m, err := r.Read()
		if err != nil {
			return fmt.Errorf("session %s: %w", hello.VMID, err)
		}
		switch m := m.(type) {
		case *wire.Extent:
			if m.Epoch != ep.N() {
				return &protoError{wire.CodeEpoch, fmt.Sprintf("extent for epoch %d, open epoch is %d", m.Epoch, ep.N())}
			}
			if err := ep.WriteExtent(int64(m.Offset), m.Data); err != nil {
				return err
			}
		case *wire.StateChunk:
			if m.Epoch != ep.N() {
				return &protoError{wire.CodeEpoch, fmt.Sprintf("state for epoch %d, open epoch is %d", m.Epoch, ep.N())}
			}
			if err := ep.WriteState(int64(m.Offset), m.Data); err != nil {
				return err
			}
		case *wire.Commit:
			if m.Epoch != ep.N() {
				return &protoError{wire.CodeEpoch, fmt.Sprintf("commit of epoch %d, open epoch is %d", m.Epoch, ep.N())}
			}
			sum := ep.Summary()
			if uint64(sum.Extents) != m.Extents || uint64(sum.Bytes) != m.Bytes || sum.Digest != m.Digest ||
				uint64(sum.StateLen) != m.StateLen || sum.StateCRC != m.StateCRC {
				return &protoError{wire.CodeMismatch, fmt.Sprintf("commit %d: client sent %d extents/%d bytes/digest %08x/state %d %08x, server has %d/%d/%08x/%d %08x",
					m.Epoch, m.Extents, m.Bytes, m.Digest, m.StateLen, m.StateCRC, sum.Extents, sum.Bytes, sum.Digest, sum.StateLen, sum.StateCRC)}
			}
			man, err := ep.Commit(ctx, m.Restorable)
			if err != nil {
				return err
			}
			log.Debug("committed", "epoch", man.Epoch, "pages", man.Pages(), "restorable", man.Restorable, "peer", peer)
			if err := w.Write(&wire.Ack{Epoch: man.Epoch}); err != nil {
				return err
			}
			if err := w.Flush(); err != nil {
				return err
			}
			if ep, err = vm.Begin(man.Epoch+1, true); err != nil {
				return err
			}
		case *wire.Fetch:
			if err := s.serveFetch(vm, m, w); err != nil {
				return err
			}
		case *wire.Error:
			return fmt.Errorf("session %s: client reports: %w", hello.VMID, m)
		default:
			return &protoError{wire.CodeProtocol, fmt.Sprintf("unexpected %s frame in session", m.Type())}
		}
	}
}

// serveFetch answers a lazy-restore read from the committed image (or the
// restore point's device state), verified page by page by the store.
func (s *Server) serveFetch(vm *backupstore.VM, f *wire.Fetch, w *wire.Writer) error {
	var data []byte
	if f.State {
		blob, _, err := vm.DeviceState()
		if err != nil {
			return err
		}
		if f.Offset >= uint64(len(blob)) {
			return &protoError{wire.CodeProtocol, fmt.Sprintf("fetch of device state at %d, blob has %d bytes", f.Offset, len(blob))}
		}
		data = blob[f.Offset:min(uint64(len(blob)), f.Offset+uint64(f.Length))]
	} else {
		data = make([]byte, f.Length)
		if _, err := vm.ReadAt(data, int64(f.Offset)); err != nil {
			return err
		}
	}
	if err := w.Write(&wire.Pages{ID: f.ID, Offset: f.Offset, CRC: wire.Checksum(data), Data: data}); err != nil {
		return err
	}
	return w.Flush()
}
