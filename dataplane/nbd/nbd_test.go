package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// memBackend is an in-memory Backend for the protocol tests: the swap
// device's own tests run the server over the real device.
type memBackend struct {
	mu      sync.Mutex
	data    []byte
	flushes int
	fail    error         // returned by WriteAt when set
	delay   time.Duration // of every WriteAt
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) Size() int64 { return int64(len(m.data)) }
func (m *memBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}
func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if m.delay > 0 {
		select {
		case <-time.After(m.delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return m.fail
	}
	copy(m.data[off:], p)
	return nil
}
func (m *memBackend) Trim(_ context.Context, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}
func (m *memBackend) Flush(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return nil
}

// serve runs a server for b on a unix socket in a temp dir and returns the
// socket path; it stops at the end of the test.
func serve(t *testing.T, b Backend, opts Options) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(b, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("nbd server did not stop")
		}
	})
	return sock
}

func dial(t *testing.T, sock string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctx10(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func needQemu(t *testing.T, tool string) string {
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Skipf("%s not installed (apt-get install qemu-utils)", tool)
	}
	return p
}

// TestQemuIO: QEMU's own NBD client negotiates, writes, reads back,
// discards and flushes through the server.
func TestQemuIO(t *testing.T) {
	qio := needQemu(t, "qemu-io")
	m := newMem(8 << 20)
	sock := serve(t, m, Options{})
	for _, export := range []string{"", "swap"} {
		url := fmt.Sprintf("nbd+unix:///%s?socket=%s", export, sock)
		out, err := exec.CommandContext(ctx10(t), qio, "-f", "raw", url,
			"-c", "write -P 0xab 0 1M",
			"-c", "write -P 0xcd -f 1M 4k",
			"-c", "aio_write -P 0x11 2M 64k",
			"-c", "aio_write -P 0x22 3M 64k",
			"-c", "aio_flush",
			"-c", "read -P 0xab 0 1M",
			"-c", "read -P 0xcd 1M 4k",
			"-c", "read -P 0x11 2M 64k",
			"-c", "read -P 0x22 3M 64k",
			"-c", "discard 0 512k",
			"-c", "read -P 0 0 512k",
			"-c", "flush",
		).CombinedOutput()
		t.Logf("qemu-io %s:\n%s", url, out)
		if err != nil || bytes.Contains(out, []byte("Pattern verification failed")) || bytes.Contains(out, []byte("failed")) {
			t.Fatalf("qemu-io against %s: %v", url, err)
		}
	}
	if m.flushes == 0 {
		t.Error("qemu-io flushed but the backend saw no Flush")
	}
}

// TestQemuImgConvert: qemu-img copies an image into the export with
// several requests in flight, and compares it back.
func TestQemuImgConvert(t *testing.T) {
	qimg := needQemu(t, "qemu-img")
	const size = 16 << 20
	src := filepath.Join(t.TempDir(), "src.img")
	data := make([]byte, size)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(data[:size/2]) // second half zero: qemu-img may skip or discard it
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	m := newMem(size)
	sock := serve(t, m, Options{})
	url := "nbd+unix:///?socket=" + sock
	out, err := exec.CommandContext(ctx10(t), qimg, "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", src, url).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	if !bytes.Equal(m.data, data) {
		t.Fatal("export content differs from the source after qemu-img convert")
	}
	out, err = exec.CommandContext(ctx10(t), qimg, "compare", "-f", "raw", "-F", "raw", src, url).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
}

// TestPipelined: many concurrent requests on one connection; the content
// matches a model afterwards, and each reply reached its own caller.
func TestPipelined(t *testing.T) {
	const size, pages = 4 << 20, 1024
	m := newMem(size)
	c := dial(t, serve(t, m, Options{MaxInFlight: 8}))
	ctx := ctx10(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := range 64 {
				page := (g*64 + i) % pages
				for j := range buf {
					buf[j] = byte(page) ^ byte(j)
				}
				if err := c.WriteAt(ctx, buf, int64(page)*4096, i%7 == 0); err != nil {
					errs <- err
					return
				}
				got := make([]byte, 4096)
				if err := c.ReadAt(ctx, got, int64(page)*4096); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, buf) {
					errs <- fmt.Errorf("page %d read back wrong", page)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestValidation: invalid requests get error replies and the connection
// goes on; requests that lose the stream disconnect.
func TestValidation(t *testing.T) {
	m := newMem(1 << 20)
	sock := serve(t, m, Options{MaxRequest: 64 << 10})
	c := dial(t, sock)
	ctx := ctx10(t)
	cases := []struct {
		name  string
		r     Request
		data  []byte
		errno uint32
	}{
		{"unaligned offset", Request{Type: cmdRead, Offset: 100, Length: 512}, nil, errInval},
		{"unaligned length", Request{Type: cmdRead, Length: 100}, nil, errInval},
		{"zero length", Request{Type: cmdRead}, nil, errInval},
		{"read past end", Request{Type: cmdRead, Offset: 1<<20 - 512, Length: 1024}, nil, errInval},
		{"read offset overflow", Request{Type: cmdRead, Offset: 1<<64 - 512, Length: 1024}, nil, errInval},
		{"read too large", Request{Type: cmdRead, Length: 128 << 10}, nil, errInval},
		{"write past end", Request{Type: cmdWrite, Offset: 1 << 20, Length: 512}, make([]byte, 512), errNoSpc},
		{"write unaligned", Request{Type: cmdWrite, Offset: 1, Length: 512}, make([]byte, 512), errInval},
		{"read with fua", Request{Type: cmdRead, Flags: cmdFlagFUA, Length: 512}, nil, errInval},
		{"unknown flag", Request{Type: cmdWrite, Flags: 1 << 9, Length: 512}, make([]byte, 512), errInval},
		{"flush with range", Request{Type: cmdFlush, Length: 512}, nil, errInval},
		{"write zeroes not offered", Request{Type: cmdWriteZeroes, Length: 512}, nil, errNotSup},
		{"block status not offered", Request{Type: cmdBlockStatus, Length: 512}, nil, errNotSup},
		{"unknown command", Request{Type: 77, Length: 512}, nil, errInval},
		{"trim past end", Request{Type: cmdTrim, Offset: 1 << 19, Length: 1 << 20}, nil, errInval},
		{"valid read", Request{Type: cmdRead, Length: 512}, nil, 0},
		{"valid large trim", Request{Type: cmdTrim, Length: 1 << 20}, nil, 0},
	}
	for _, tc := range cases {
		var rb []byte
		if tc.r.Type == cmdRead && tc.errno == 0 {
			rb = make([]byte, tc.r.Length)
		}
		errno, err := c.Raw(ctx, tc.r, tc.data, rb)
		if err != nil {
			t.Fatalf("%s: connection lost: %v", tc.name, err)
		}
		if errno != tc.errno {
			t.Errorf("%s: errno %d, want %d", tc.name, errno, tc.errno)
		}
	}
	// The data written by rejected writes must not have landed anywhere.
	if !bytes.Equal(m.data, make([]byte, len(m.data))) {
		t.Error("a rejected write changed the export")
	}
	// A write whose payload is over the limit cannot be skipped: dropped.
	_, err := c.Raw(ctx, Request{Type: cmdWrite, Length: 1 << 20}, make([]byte, 1<<20), nil)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("oversized write: %v, want the connection dropped", err)
	}
	// Bad request magic: dropped.
	raw := handshakeRaw(t, sock)
	raw.Write([]byte("this is not an NBD request header"))
	expectClosed(t, raw)
}

// TestBackendErrors: backend errors become NBD errnos; the connection
// survives them.
func TestBackendErrors(t *testing.T) {
	m := newMem(1 << 20)
	c := dial(t, serve(t, m, Options{}))
	ctx := ctx10(t)
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{fmt.Errorf("local disk: %w", syscall.ENOSPC), syscall.ENOSPC},
		{errors.New("repository and disk both gone"), syscall.EIO},
	} {
		m.mu.Lock()
		m.fail = tc.err
		m.mu.Unlock()
		err := c.WriteAt(ctx, make([]byte, 4096), 0, false)
		if !errors.Is(err, tc.want) {
			t.Errorf("backend error %v: client got %v, want %v", tc.err, err, tc.want)
		}
	}
	m.mu.Lock()
	m.fail = nil
	m.mu.Unlock()
	if err := c.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatalf("after errors: %v", err)
	}
}

// TestDiscWaitsInFlight: requests in flight when DISC arrives still reply
// and take effect.
func TestDiscWaitsInFlight(t *testing.T) {
	m := newMem(1 << 20)
	m.delay = 200 * time.Millisecond
	sock := serve(t, m, Options{})
	conn := handshakeRaw(t, sock)
	payload := bytes.Repeat([]byte{0x5a}, 4096)
	b := AppendRequest(nil, Request{Type: cmdWrite, Handle: 7, Length: 4096})
	b = append(b, payload...)
	b = AppendRequest(b, Request{Type: cmdDisc, Handle: 8})
	conn.Write(b)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var h [replyHeaderSize]byte
	if _, err := io.ReadFull(conn, h[:]); err != nil {
		t.Fatalf("no reply to the write in flight at DISC: %v", err)
	}
	if be.Uint64(h[8:]) != 7 || be.Uint32(h[4:]) != 0 {
		t.Fatalf("reply handle %d errno %d", be.Uint64(h[8:]), be.Uint32(h[4:]))
	}
	expectClosed(t, conn)
	if !bytes.Equal(m.data[:4096], payload) {
		t.Fatal("write in flight at DISC did not land")
	}
}

// handshakeRaw opens a raw connection through NBD_OPT_EXPORT_NAME (the
// old-fashioned way), leaving it in transmission.
func handshakeRaw(t *testing.T, sock string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	g := make([]byte, 18)
	if _, err := io.ReadFull(conn, g); err != nil {
		t.Fatal(err)
	}
	b := be.AppendUint32(nil, flagFixedNewstyle) // with zeroes
	b = be.AppendUint64(b, magicIHaveOpt)
	b = be.AppendUint32(b, optExportName)
	b = be.AppendUint32(b, 4)
	b = append(b, "swap"...)
	conn.Write(b)
	ed := make([]byte, 8+2+124)
	if _, err := io.ReadFull(conn, ed); err != nil {
		t.Fatalf("export data: %v", err)
	}
	if be.Uint64(ed) != 1<<20 && be.Uint64(ed) == 0 {
		t.Fatalf("export size %d", be.Uint64(ed))
	}
	conn.SetDeadline(time.Time{})
	return conn
}

func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("server did not close the connection")
		}
	}
	_ = n
}

// TestHandshake: option haggling, good and bad.
func TestHandshake(t *testing.T) {
	sock := serve(t, newMem(1<<20), Options{})
	open := func(flags uint32) net.Conn {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		g := make([]byte, 18)
		if _, err := io.ReadFull(conn, g); err != nil {
			t.Fatal(err)
		}
		if be.Uint64(g) != magicNBD || be.Uint64(g[8:]) != magicIHaveOpt || be.Uint16(g[16:]) != flagFixedNewstyle|flagNoZeroes {
			t.Fatalf("greeting %x", g)
		}
		conn.Write(be.AppendUint32(nil, flags))
		return conn
	}
	opt := func(c net.Conn, o uint32, d []byte) {
		b := be.AppendUint64(nil, magicIHaveOpt)
		b = be.AppendUint32(b, o)
		b = be.AppendUint32(b, uint32(len(d)))
		c.Write(append(b, d...))
	}
	reply := func(c net.Conn) (uint32, []byte) {
		h := make([]byte, 20)
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatalf("option reply: %v", err)
		}
		d := make([]byte, be.Uint32(h[16:]))
		io.ReadFull(c, d)
		return be.Uint32(h[12:]), d
	}

	t.Run("unknown client flags close", func(t *testing.T) { expectClosed(t, open(flagFixedNewstyle|1<<7)) })
	t.Run("not fixed newstyle closes", func(t *testing.T) { expectClosed(t, open(0)) })
	t.Run("bad option magic closes", func(t *testing.T) {
		c := open(flagFixedNewstyle)
		c.Write(make([]byte, 16))
		expectClosed(t, c)
	})
	t.Run("huge option closes", func(t *testing.T) {
		c := open(flagFixedNewstyle)
		b := be.AppendUint64(nil, magicIHaveOpt)
		b = be.AppendUint32(b, optGo)
		c.Write(be.AppendUint32(b, 1<<30))
		expectClosed(t, c)
	})
	t.Run("unknown export by name closes", func(t *testing.T) {
		c := open(flagFixedNewstyle)
		opt(c, optExportName, []byte("nope"))
		expectClosed(t, c)
	})
	t.Run("go: unknown, malformed, unsupported, list, info, abort", func(t *testing.T) {
		c := open(flagFixedNewstyle | flagNoZeroes)
		opt(c, optGo, appendGo(nil, "nope"))
		if typ, _ := reply(c); typ != repErrUnknown {
			t.Errorf("unknown export: reply %#x", typ)
		}
		opt(c, optGo, []byte{0, 0, 0, 9, 'x'})
		if typ, _ := reply(c); typ != repErrInvalid {
			t.Errorf("malformed go: reply %#x", typ)
		}
		opt(c, optStructuredRepl, nil)
		if typ, _ := reply(c); typ != repErrUnsup {
			t.Errorf("structured replies: reply %#x", typ)
		}
		opt(c, optStartTLS, nil)
		if typ, _ := reply(c); typ != repErrPolicy {
			t.Errorf("starttls: reply %#x", typ)
		}
		opt(c, optList, nil)
		if typ, d := reply(c); typ != repServer || string(d[4:]) != "swap" {
			t.Errorf("list: reply %#x %q", typ, d)
		}
		if typ, _ := reply(c); typ != repAck {
			t.Errorf("list end: reply %#x", typ)
		}
		opt(c, optInfo, appendGo(nil, "swap", infoBlockSize))
		typ, d := reply(c)
		if typ != repInfo || be.Uint16(d) != infoExport || be.Uint64(d[2:]) != 1<<20 {
			t.Errorf("info: reply %#x %x", typ, d)
		}
		if typ, d := reply(c); typ != repInfo || be.Uint16(d) != infoBlockSize || be.Uint32(d[2:]) != BlockSize {
			t.Errorf("info block size: reply %#x %x", typ, d)
		}
		if typ, _ := reply(c); typ != repAck {
			t.Errorf("info end: reply %#x", typ)
		}
		opt(c, optAbort, nil)
		if typ, _ := reply(c); typ != repAck {
			t.Errorf("abort: reply %#x", typ)
		}
		expectClosed(t, c)
	})
	t.Run("too many options close", func(t *testing.T) {
		c := open(flagFixedNewstyle)
		for range 40 {
			opt(c, 99, nil)
		}
		for range 32 {
			if typ, _ := reply(c); typ != repErrUnsup {
				t.Fatalf("unknown option: reply %#x", typ)
			}
		}
		expectClosed(t, c)
	})
}

// FuzzRequest: the request decoder and validator never panic, and a
// request they accept lies inside the export and the limits.
func FuzzRequest(f *testing.F) {
	f.Add(AppendRequest(nil, Request{Type: cmdRead, Length: 4096}))
	f.Add(AppendRequest(nil, Request{Type: cmdWrite, Flags: cmdFlagFUA, Offset: 1 << 20, Length: 512}))
	f.Add(AppendRequest(nil, Request{Type: cmdTrim, Offset: 1<<64 - 512, Length: 1024}))
	f.Add(AppendRequest(nil, Request{Type: cmdFlush}))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
			}
			return
		}
		if !bytes.Equal(AppendRequest(nil, r), b) {
			t.Fatal("re-encoding differs")
		}
		const size, maxReq = 1 << 30, 1 << 20
		v, errno := check(r, size, maxReq)
		if v != doServe {
			if errno == 0 {
				t.Fatal("rejected without an errno")
			}
			return
		}
		switch r.Type {
		case cmdRead, cmdWrite, cmdTrim:
			end := r.Offset + uint64(r.Length)
			if end < r.Offset || end > size || r.Offset%BlockSize != 0 || r.Length%BlockSize != 0 || r.Length == 0 {
				t.Fatalf("accepted %+v", r)
			}
			if r.Type != cmdTrim && r.Length > maxReq {
				t.Fatalf("accepted oversized %+v", r)
			}
		case cmdFlush, cmdDisc:
		default:
			t.Fatalf("accepted type %d", r.Type)
		}
	})
}

// FuzzHandshake feeds arbitrary client bytes to the option haggling: it
// must end (error, abort or transmission) without panicking.
func FuzzHandshake(f *testing.F) {
	good := be.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{{optList, nil}, {optInfo, appendGo(nil, "swap", infoBlockSize)}, {optGo, appendGo(nil, "")}} {
		good = be.AppendUint64(good, magicIHaveOpt)
		good = be.AppendUint32(good, o.opt)
		good = be.AppendUint32(good, uint32(len(o.data)))
		good = append(good, o.data...)
	}
	f.Add(good)
	f.Add(good[:20])
	f.Add([]byte{0, 0, 0, 1})
	srv, _ := NewServer(newMem(1<<20), Options{Logger: quietLogger()})
	f.Fuzz(func(t *testing.T, in []byte) {
		rw := newRW(in)
		srv.handshake(rw)
	})
}

// FuzzTransmit feeds arbitrary request streams to the transmission phase.
func FuzzTransmit(f *testing.F) {
	var s []byte
	s = AppendRequest(s, Request{Type: cmdWrite, Handle: 1, Length: 512})
	s = append(s, make([]byte, 512)...)
	s = AppendRequest(s, Request{Type: cmdRead, Handle: 2, Offset: 512, Length: 1024})
	s = AppendRequest(s, Request{Type: cmdTrim, Handle: 3, Length: 4096})
	s = AppendRequest(s, Request{Type: cmdFlush, Handle: 4})
	s = AppendRequest(s, Request{Type: cmdWrite, Handle: 5, Offset: 1 << 20, Length: 512})
	f.Add(s)
	f.Add(AppendRequest(s, Request{Type: cmdDisc}))
	f.Fuzz(func(t *testing.T, in []byte) {
		srv, _ := NewServer(newMem(64<<10), Options{MaxRequest: 8 << 10, MaxInFlight: 2, Logger: quietLogger()})
		srv.transmit(context.Background(), newRW(in))
	})
}

func newRW(in []byte) *bufio.ReadWriter {
	return bufio.NewReadWriter(bufio.NewReader(bytes.NewReader(in)), bufio.NewWriter(io.Discard))
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
