package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"hostd/hostd/accept"
)

// Backend is the block device a Server exports. Calls come concurrently;
// offsets and lengths are multiples of BlockSize and inside Size().
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt with fua set returns only once p is durable.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Trim says the range's content is no longer needed.
	Trim(ctx context.Context, off, length int64) error
	// Flush makes every write that completed before it durable.
	Flush(ctx context.Context) error
	Size() int64
}

// Options tune a Server.
type Options struct {
	// ExportName is the one export's name; a client may also ask for the
	// default export (""). Default "swap".
	ExportName string
	Logger     *slog.Logger
	// MaxRequest bounds one request's payload; default DefaultMaxRequest.
	// A multiple of BlockSize.
	MaxRequest uint32
	// MaxInFlight bounds the requests served at once per connection (and
	// so the payload memory: MaxInFlight x MaxRequest). Default 16.
	MaxInFlight int
	// HandshakeTimeout bounds the option haggling; default 10 s.
	HandshakeTimeout time.Duration
	// MaxOptions bounds the options of one handshake; default 32.
	MaxOptions int
}

// Server exports one Backend over NBD.
type Server struct {
	b    Backend
	opts Options
	log  *slog.Logger
}

// NewServer makes a server for b.
func NewServer(b Backend, opts Options) (*Server, error) {
	if b == nil || b.Size() <= 0 || b.Size()%BlockSize != 0 {
		return nil, fmt.Errorf("new nbd server: backend size must be a positive multiple of %d", BlockSize)
	}
	if opts.ExportName == "" {
		opts.ExportName = "swap"
	}
	if len(opts.ExportName) > maxNameLen {
		return nil, errors.New("new nbd server: export name longer than 4096 bytes")
	}
	if opts.MaxRequest == 0 {
		opts.MaxRequest = DefaultMaxRequest
	}
	if opts.MaxRequest%BlockSize != 0 || opts.MaxRequest > 1<<30 {
		return nil, fmt.Errorf("new nbd server: max request %d is not a multiple of %d up to 1 GiB", opts.MaxRequest, BlockSize)
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 16
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.MaxOptions <= 0 {
		opts.MaxOptions = 32
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	return &Server{b: b, opts: opts, log: l.With("component", "nbd", "export", opts.ExportName)}, nil
}

// Serve accepts connections on ln until ctx ends, then closes ln and every
// connection (after the requests in flight) and returns ctx's error.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	return accept.Serve(ctx, ln, "nbd", s.ServeConn)
}

// ServeConn serves one connection until the client disconnects, breaks
// the protocol, or ctx ends; it closes c.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	log := s.log
	rw := bufio.NewReadWriter(bufio.NewReaderSize(c, 64<<10), bufio.NewWriterSize(c, 64<<10))
	c.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	transmit, err := s.handshake(rw)
	if err != nil {
		if ctx.Err() == nil {
			log.Warn("nbd handshake failed", "err", err)
		}
		return
	}
	if !transmit {
		return
	}
	c.SetDeadline(time.Time{})
	err = s.transmit(ctx, rw)
	switch {
	case err == nil, errors.Is(err, io.EOF), ctx.Err() != nil:
		log.Debug("nbd client disconnected")
	default:
		log.Warn("nbd connection dropped", "err", err)
	}
}

func (s *Server) nameOK(name string) bool { return name == "" || name == s.opts.ExportName }

func (s *Server) transmitFlags() uint16 {
	return tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim
}

// handshake runs the fixed newstyle negotiation on rw. It returns true when
// the client entered transmission; false with a nil error when it aborted.
// Any framing error is returned and the caller closes: there is no way to
// resynchronise a handshake.
func (s *Server) handshake(rw *bufio.ReadWriter) (bool, error) {
	var hdr [18]byte
	be.PutUint64(hdr[0:], magicNBD)
	be.PutUint64(hdr[8:], magicIHaveOpt)
	be.PutUint16(hdr[16:], flagFixedNewstyle|flagNoZeroes)
	rw.Write(hdr[:])
	if err := rw.Flush(); err != nil {
		return false, fmt.Errorf("nbd handshake: send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(rw, cf[:]); err != nil {
		return false, fmt.Errorf("nbd handshake: read client flags: %w", err)
	}
	cflags := be.Uint32(cf[:])
	if cflags&^uint32(flagFixedNewstyle|flagNoZeroes) != 0 || cflags&flagFixedNewstyle == 0 {
		return false, fmt.Errorf("%w: client flags %#x (need fixed newstyle, nothing unknown)", ErrMalformed, cflags)
	}
	noZeroes := cflags&flagNoZeroes != 0
	var oh [optHeaderSize]byte
	for range s.opts.MaxOptions {
		if _, err := io.ReadFull(rw, oh[:]); err != nil {
			return false, fmt.Errorf("nbd handshake: read option: %w", err)
		}
		if m := be.Uint64(oh[0:]); m != magicIHaveOpt {
			return false, fmt.Errorf("%w: option magic %#x", ErrMalformed, m)
		}
		opt, n := be.Uint32(oh[8:]), be.Uint32(oh[12:])
		if n > maxOptionData {
			return false, fmt.Errorf("%w: option %d with %d bytes of data", ErrMalformed, opt, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(rw, data); err != nil {
			return false, fmt.Errorf("nbd handshake: read option %d data: %w", opt, err)
		}
		done, transmit, err := s.option(rw, opt, data, noZeroes)
		if err != nil {
			return false, err
		}
		if err := rw.Flush(); err != nil {
			return false, fmt.Errorf("nbd handshake: reply to option %d: %w", opt, err)
		}
		if done {
			return transmit, nil
		}
	}
	return false, fmt.Errorf("%w: more than %d options", ErrMalformed, s.opts.MaxOptions)
}

// option answers one option. done: the handshake is over (transmit says
// whether transmission follows).
func (s *Server) option(w io.Writer, opt uint32, data []byte, noZeroes bool) (done, transmit bool, err error) {
	size := uint64(s.b.Size())
	switch opt {
	case optExportName:
		// No reply is possible but the export data: an unknown name can
		// only be refused by closing.
		if len(data) > maxNameLen || !s.nameOK(string(data)) {
			return true, false, fmt.Errorf("nbd handshake: unknown export %q requested", truncate(data))
		}
		b := be.AppendUint64(nil, size)
		b = be.AppendUint16(b, s.transmitFlags())
		if !noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		_, err := w.Write(b)
		return true, true, err
	case optAbort:
		writeOptReply(w, opt, repAck, nil)
		return true, false, nil
	case optList:
		if len(data) != 0 {
			return false, false, writeOptReply(w, opt, repErrInvalid, []byte("list takes no data"))
		}
		d := be.AppendUint32(nil, uint32(len(s.opts.ExportName)))
		d = append(d, s.opts.ExportName...)
		writeOptReply(w, opt, repServer, d)
		return false, false, writeOptReply(w, opt, repAck, nil)
	case optInfo, optGo:
		g, err := parseGo(data)
		if err != nil {
			return false, false, writeOptReply(w, opt, repErrInvalid, []byte(err.Error()))
		}
		if !s.nameOK(g.name) {
			return false, false, writeOptReply(w, opt, repErrUnknown, []byte("no such export"))
		}
		d := be.AppendUint16(nil, infoExport)
		d = be.AppendUint64(d, size)
		d = be.AppendUint16(d, s.transmitFlags())
		writeOptReply(w, opt, repInfo, d)
		// Block sizes are sent whether asked or not (the protocol allows
		// it): alignment is enforced, so a client had better know.
		d = be.AppendUint16(nil, infoBlockSize)
		d = be.AppendUint32(d, BlockSize)
		d = be.AppendUint32(d, PreferredBlockSize)
		d = be.AppendUint32(d, s.opts.MaxRequest)
		writeOptReply(w, opt, repInfo, d)
		err = writeOptReply(w, opt, repAck, nil)
		return opt == optGo, opt == optGo, err
	case optStartTLS:
		// Unix socket to a local QEMU: TLS adds nothing.
		return false, false, writeOptReply(w, opt, repErrPolicy, []byte("no TLS on this local socket"))
	default:
		return false, false, writeOptReply(w, opt, repErrUnsup, nil)
	}
}

func truncate(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}

func writeOptReply(w io.Writer, opt, typ uint32, data []byte) error {
	b := make([]byte, 0, 20+len(data))
	b = be.AppendUint64(b, magicOptReply)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	_, err := w.Write(b)
	return err
}

// conn is the transmission phase of one connection.
type conn struct {
	s   *Server
	ctx context.Context

	wmu  sync.Mutex // one reply at a time on the wire
	w    *bufio.Writer
	werr error
	// pending counts replies not yet written; the writer flushes when it
	// reaches zero, so a burst of pipelined replies shares one syscall.
	pending int
}

// transmit reads requests and dispatches them to at most MaxInFlight
// goroutines. It returns after every started request has replied.
func (s *Server) transmit(ctx context.Context, rw *bufio.ReadWriter) error {
	c := &conn{s: s, ctx: ctx, w: rw.Writer}
	sem := make(chan struct{}, s.opts.MaxInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	size := s.b.Size()
	var hb [RequestHeaderSize]byte
	for {
		if _, err := io.ReadFull(rw, hb[:]); err != nil {
			return fmt.Errorf("nbd: read request: %w", err)
		}
		r, err := DecodeRequest(hb[:])
		if err != nil {
			return err
		}
		v, errno := check(r, size, s.opts.MaxRequest)
		switch v {
		case doDisconnect:
			return fmt.Errorf("%w: %s of %d bytes exceeds the %d-byte limit", ErrMalformed, cmdName(r.Type), r.Length, s.opts.MaxRequest)
		case doReject:
			if r.Type == cmdWrite {
				if _, err := io.CopyN(io.Discard, rw, int64(r.Length)); err != nil {
					return fmt.Errorf("nbd: skip rejected write payload: %w", err)
				}
			}
			if err := c.reply(r.Handle, errno, nil); err != nil {
				return err
			}
			continue
		}
		if r.Type == cmdDisc {
			return nil // the deferred Wait lets requests in flight reply
		}
		var buf []byte
		if r.Type == cmdRead || r.Type == cmdWrite {
			buf = make([]byte, r.Length)
		}
		if r.Type == cmdWrite {
			if _, err := io.ReadFull(rw, buf); err != nil {
				return fmt.Errorf("nbd: read write payload: %w", err)
			}
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		c.wmu.Lock()
		c.pending++
		werr := c.werr
		c.wmu.Unlock()
		if werr != nil {
			<-sem
			return werr
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c.serve(r, buf)
		}()
	}
}

func (c *conn) serve(r Request, buf []byte) {
	b, ctx := c.s.b, c.ctx
	var err error
	switch r.Type {
	case cmdRead:
		err = b.ReadAt(ctx, buf, int64(r.Offset))
	case cmdWrite:
		err = b.WriteAt(ctx, buf, int64(r.Offset), r.Flags&cmdFlagFUA != 0)
		buf = nil
	case cmdTrim:
		err = b.Trim(ctx, int64(r.Offset), int64(r.Length))
		if err == nil && r.Flags&cmdFlagFUA != 0 {
			err = b.Flush(ctx)
		}
	case cmdFlush:
		err = b.Flush(ctx)
	}
	errno := errnoOf(err)
	if err != nil {
		c.s.log.Warn("nbd request failed", "cmd", cmdName(r.Type), "offset", r.Offset, "length", r.Length, "errno", errno, "err", err)
		buf = nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.writeReplyLocked(r.Handle, errno, buf)
}

// reply writes a reply from the reading goroutine (rejections).
func (c *conn) reply(handle uint64, errno uint32, data []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.pending++
	c.writeReplyLocked(handle, errno, data)
	return c.werr
}

func (c *conn) writeReplyLocked(handle uint64, errno uint32, data []byte) {
	c.pending--
	if c.werr != nil {
		return
	}
	var h [replyHeaderSize]byte
	be.PutUint32(h[0:], magicSimpleRep)
	be.PutUint32(h[4:], errno)
	be.PutUint64(h[8:], handle)
	c.w.Write(h[:])
	if errno == 0 && data != nil {
		c.w.Write(data)
	}
	if c.pending == 0 {
		if err := c.w.Flush(); err != nil {
			c.werr = fmt.Errorf("nbd: write reply: %w", err)
		}
	}
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block-status"
	case cmdResize:
		return "resize"
	}
	return fmt.Sprintf("cmd(%d)", t)
}
