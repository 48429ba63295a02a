package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// Client is a small NBD client (fixed newstyle, NBD_OPT_GO, simple
// replies) for tests, benchmarks and health probes. Calls may be made
// concurrently: they are pipelined on the one connection and matched to
// replies by handle. A call whose ctx ends closes the client, because the
// reply to an abandoned read would still land in the caller's buffer.
type Client struct {
	c     net.Conn
	size  int64
	flags uint16

	wmu sync.Mutex
	w   *bufio.Writer

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]*call
	err     error // set once the connection is broken
	done    chan struct{}
}

type call struct {
	buf   []byte // read destination
	errno uint32
	done  chan struct{}
}

// ErrClosed is returned by calls on a closed or broken client.
var ErrClosed = errors.New("nbd client: connection closed")

// Dial connects to an NBD server (network "unix" or "tcp") and negotiates
// the export with NBD_OPT_GO.
func Dial(ctx context.Context, network, addr, export string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	cl, err := NewClient(ctx, c, export)
	if err != nil {
		c.Close()
		return nil, err
	}
	return cl, nil
}

// NewClient negotiates export on an open connection and starts the reply
// reader. The client owns c.
func NewClient(ctx context.Context, c net.Conn, export string) (*Client, error) {
	stop := context.AfterFunc(ctx, func() { c.Close() })
	r := bufio.NewReaderSize(c, 64<<10)
	size, flags, err := clientHandshake(r, c, export)
	if !stop() {
		return nil, fmt.Errorf("nbd handshake: %w", ctx.Err())
	}
	if err != nil {
		return nil, err
	}
	cl := &Client{c: c, size: size, flags: flags, w: bufio.NewWriterSize(c, 64<<10), waiting: map[uint64]*call{}, done: make(chan struct{})}
	go cl.readLoop(r)
	return cl, nil
}

func clientHandshake(r *bufio.Reader, w io.Writer, export string) (int64, uint16, error) {
	var g [18]byte
	if _, err := io.ReadFull(r, g[:]); err != nil {
		return 0, 0, fmt.Errorf("nbd handshake: read greeting: %w", err)
	}
	if be.Uint64(g[0:]) != magicNBD || be.Uint64(g[8:]) != magicIHaveOpt {
		return 0, 0, fmt.Errorf("%w: not an NBD newstyle server", ErrMalformed)
	}
	if be.Uint16(g[16:])&flagFixedNewstyle == 0 {
		return 0, 0, fmt.Errorf("%w: server is not fixed newstyle", ErrMalformed)
	}
	data := appendGo(nil, export, infoBlockSize)
	b := be.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	b = be.AppendUint64(b, magicIHaveOpt)
	b = be.AppendUint32(b, optGo)
	b = be.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	if _, err := w.Write(b); err != nil {
		return 0, 0, fmt.Errorf("nbd handshake: send go: %w", err)
	}
	var size int64 = -1
	var flags uint16
	for range 16 {
		var h [20]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return 0, 0, fmt.Errorf("nbd handshake: read option reply: %w", err)
		}
		if be.Uint64(h[0:]) != magicOptReply || be.Uint32(h[8:]) != optGo {
			return 0, 0, fmt.Errorf("%w: bad option reply header", ErrMalformed)
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if n > maxOptionData {
			return 0, 0, fmt.Errorf("%w: option reply of %d bytes", ErrMalformed, n)
		}
		d := make([]byte, n)
		if _, err := io.ReadFull(r, d); err != nil {
			return 0, 0, fmt.Errorf("nbd handshake: read option reply: %w", err)
		}
		switch {
		case typ == repAck:
			if size < 0 {
				return 0, 0, fmt.Errorf("%w: go acknowledged without export info", ErrMalformed)
			}
			return size, flags, nil
		case typ == repInfo && len(d) >= 2 && be.Uint16(d) == infoExport:
			if len(d) != 12 {
				return 0, 0, fmt.Errorf("%w: export info of %d bytes", ErrMalformed, len(d))
			}
			size, flags = int64(be.Uint64(d[2:])), be.Uint16(d[10:])
		case typ == repInfo:
		case typ&(1<<31) != 0:
			return 0, 0, fmt.Errorf("nbd handshake: server refused export %q: error %#x: %s", export, typ, d)
		}
	}
	return 0, 0, fmt.Errorf("%w: too many option replies", ErrMalformed)
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

func (c *Client) readLoop(r *bufio.Reader) {
	err := func() error {
		var h [replyHeaderSize]byte
		for {
			if _, err := io.ReadFull(r, h[:]); err != nil {
				return err
			}
			if be.Uint32(h[0:]) != magicSimpleRep {
				return fmt.Errorf("%w: reply magic %#x", ErrMalformed, be.Uint32(h[0:]))
			}
			handle := be.Uint64(h[8:])
			c.mu.Lock()
			cl := c.waiting[handle]
			delete(c.waiting, handle)
			c.mu.Unlock()
			if cl == nil {
				return fmt.Errorf("%w: reply to unknown handle %d", ErrMalformed, handle)
			}
			cl.errno = be.Uint32(h[4:])
			if cl.errno == 0 && cl.buf != nil {
				if _, err := io.ReadFull(r, cl.buf); err != nil {
					return err
				}
			}
			close(cl.done)
		}
	}()
	c.fail(err)
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = fmt.Errorf("%w: %w", ErrClosed, err)
	c.c.Close()
	for h, cl := range c.waiting {
		cl.errno = errShutdown
		close(cl.done)
		delete(c.waiting, h)
	}
	close(c.done)
}

func (c *Client) do(ctx context.Context, typ, flags uint16, off uint64, length uint32, payload, readBuf []byte) error {
	cl := &call{buf: readBuf, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.next++
	h := c.next
	c.waiting[h] = cl
	c.mu.Unlock()

	hdr := AppendRequest(make([]byte, 0, RequestHeaderSize), Request{Flags: flags, Type: typ, Handle: h, Offset: off, Length: length})
	c.wmu.Lock()
	c.w.Write(hdr)
	c.w.Write(payload)
	err := c.w.Flush()
	c.wmu.Unlock()
	if err != nil {
		c.fail(err)
	}
	select {
	case <-cl.done:
	case <-ctx.Done():
		c.fail(ctx.Err())
		<-cl.done
		return fmt.Errorf("nbd %s: %w", cmdName(typ), ctx.Err())
	}
	if cl.errno == errShutdown {
		c.mu.Lock()
		err := c.err
		c.mu.Unlock()
		if err != nil {
			return err
		}
	}
	return errorOf(cl.errno)
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.do(ctx, cmdRead, 0, uint64(off), uint32(len(p)), nil, p)
}

// WriteAt writes p at off; fua asks for durability before the reply.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = cmdFlagFUA
	}
	return c.do(ctx, cmdWrite, f, uint64(off), uint32(len(p)), p, nil)
}

// Trim discards a range.
func (c *Client) Trim(ctx context.Context, off, length int64) error {
	return c.do(ctx, cmdTrim, 0, uint64(off), uint32(length), nil, nil)
}

// Flush waits for every completed write to be durable.
func (c *Client) Flush(ctx context.Context) error {
	return c.do(ctx, cmdFlush, 0, 0, 0, nil, nil)
}

// Raw sends an arbitrary request (tests of the server's validation) and
// returns the reply's error number; a read reply's data goes to readBuf.
func (c *Client) Raw(ctx context.Context, r Request, payload, readBuf []byte) (uint32, error) {
	err := c.do(ctx, r.Type, r.Flags, r.Offset, r.Length, payload, readBuf)
	if err == nil {
		return 0, nil
	}
	var e *ReplyError
	if errors.As(err, &e) {
		return uint32(e.Errno), nil
	}
	return 0, err
}

// Close sends NBD_CMD_DISC and closes the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	broken := c.err != nil
	c.mu.Unlock()
	if !broken {
		hdr := AppendRequest(nil, Request{Type: cmdDisc})
		c.wmu.Lock()
		c.w.Write(hdr)
		c.w.Flush()
		c.wmu.Unlock()
	}
	c.fail(ErrClosed)
	return nil
}
