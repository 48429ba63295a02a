package repo_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"hostd/dataplane/repo"
	"hostd/dataplane/repo/repotest"
)

func page(seed byte) []byte {
	p := make([]byte, repo.PageSize)
	for i := range p {
		p[i] = seed ^ byte(i*7)
	}
	return p
}

func pages(n int, seed byte) []byte {
	var b []byte
	for i := range n {
		b = append(b, page(seed+byte(i))...)
	}
	return b
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func client(t *testing.T, dir, host, addr string, cfg repo.ClientConfig) *repo.Client {
	t.Helper()
	cfg.Addr, cfg.TLS = addr, repotest.ClientTLS(t, dir, host)
	if cfg.RetryMax == 0 {
		cfg.RetryMin, cfg.RetryMax = 50*time.Millisecond, 200*time.Millisecond
	}
	c, err := repo.Dial(ctxT(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestPutGetFree over mutual TLS on loopback, including batches larger than
// one frame, pipelined from many goroutines.
func TestPutGetFree(t *testing.T) {
	dir := repotest.PKI(t, "hostA")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 16 << 20})
	c := client(t, dir, "hostA", r.Addr, repo.ClientConfig{})
	ctx := ctxT(t)

	data := pages(300, 1) // two frames
	caps, err := c.Put(ctx, data)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[repo.Cap]bool{}
	for _, cp := range caps {
		if seen[cp] {
			t.Fatal("duplicate capability")
		}
		seen[cp] = true
	}
	got := make([]byte, len(data))
	present, err := c.Get(ctx, caps, got)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range present {
		if !p {
			t.Fatalf("page %d missing", i)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("pages read back differ")
	}
	if st := r.Server.Status(); st.Used != 300*repo.PageSize || len(st.Clients) != 1 || st.Clients[0].Name != "hostA" {
		t.Fatalf("status %+v", st)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20 {
				d := pages(1+i%4, byte(g*20+i))
				cs, err := c.Put(ctx, d)
				if err != nil {
					errs <- err
					return
				}
				b := make([]byte, len(d))
				if _, err := c.Get(ctx, cs, b); err != nil || !bytes.Equal(b, d) {
					errs <- fmt.Errorf("goroutine %d round %d: read back wrong (%v)", g, i, err)
					return
				}
				if n, err := c.Free(ctx, cs); err != nil || n != len(cs) {
					errs <- fmt.Errorf("free: %d %v", n, err)
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
	if n, err := c.Free(ctx, caps); err != nil || n != 300 {
		t.Fatalf("free: %d %v", n, err)
	}
	if st := r.Server.Status(); st.Used != 0 {
		t.Fatalf("used %d after freeing everything", st.Used)
	}
	present, err = c.Get(ctx, caps[:3], make([]byte, 3*repo.PageSize))
	if err != nil || present[0] || present[1] || present[2] {
		t.Fatalf("freed pages still readable: %v %v", present, err)
	}
}

// TestForgedCapability: random capabilities and another client's are
// absent; freeing them frees nothing; the owner's page is intact.
func TestForgedCapability(t *testing.T) {
	dir := repotest.PKI(t, "hostA", "hostB")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 4 << 20})
	a := client(t, dir, "hostA", r.Addr, repo.ClientConfig{})
	a2 := client(t, dir, "hostA", r.Addr, repo.ClientConfig{}) // same host, another session (another VM)
	b := client(t, dir, "hostB", r.Addr, repo.ClientConfig{})
	ctx := ctxT(t)
	caps, err := a.Put(ctx, page(9))
	if err != nil {
		t.Fatal(err)
	}
	forged := caps[0]
	forged[15] ^= 1
	for name, tc := range map[string]struct {
		c   *repo.Client
		cap repo.Cap
	}{
		"forged":        {a, forged},
		"zero":          {a, repo.Cap{}},
		"other host":    {b, caps[0]},
		"other session": {a2, caps[0]},
	} {
		buf := bytes.Repeat([]byte{0xee}, repo.PageSize)
		present, err := tc.c.Get(ctx, []repo.Cap{tc.cap}, buf)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if present[0] || !bytes.Equal(buf, bytes.Repeat([]byte{0xee}, repo.PageSize)) {
			t.Errorf("%s capability read a page", name)
		}
		if n, err := tc.c.Free(ctx, []repo.Cap{tc.cap}); err != nil || n != 0 {
			t.Errorf("%s capability freed %d pages (%v)", name, n, err)
		}
	}
	buf := make([]byte, repo.PageSize)
	if p, err := a.Get(ctx, caps, buf); err != nil || !p[0] || !bytes.Equal(buf, page(9)) {
		t.Fatalf("owner's page damaged: %v %v", p, err)
	}
}

// TestQuotaAndCapacity: a client's quota and the repository's capacity
// are enforced with ErrFull, and freeing makes room again.
func TestQuotaAndCapacity(t *testing.T) {
	dir := repotest.PKI(t, "hostA", "hostB")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 2 << 20, Quotas: map[string]int64{"hostA": 1 << 20}})
	a := client(t, dir, "hostA", r.Addr, repo.ClientConfig{})
	b := client(t, dir, "hostB", r.Addr, repo.ClientConfig{})
	ctx := ctxT(t)
	if a.Available() != 1<<20 {
		t.Errorf("hostA available %d, want its quota", a.Available())
	}
	caps, err := a.Put(ctx, pages(256, 0))
	if err != nil {
		t.Fatal(err)
	}
	if a.Available() != 0 {
		t.Errorf("available %d after filling the quota", a.Available())
	}
	if _, err := a.Put(ctx, page(1)); !errors.Is(err, repo.ErrFull) {
		t.Fatalf("put past quota: %v, want ErrFull", err)
	}
	if _, err := b.Put(ctx, pages(256, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Put(ctx, page(1)); !errors.Is(err, repo.ErrFull) {
		t.Fatalf("put past capacity: %v, want ErrFull", err)
	}
	if st := r.Server.Status(); st.Used != st.Capacity {
		t.Fatalf("status %+v", st)
	}
	// A failed multi-frame Put leaves nothing behind.
	a.Free(ctx, caps[:10])
	if _, err := a.Put(ctx, pages(300, 0)); !errors.Is(err, repo.ErrFull) {
		t.Fatalf("oversized put: %v", err)
	}
	if st := r.Server.Status(); st.Used != st.Capacity-10*repo.PageSize {
		t.Fatalf("a failed put left pages behind: used %d", st.Used)
	}
	if _, err := a.Put(ctx, pages(10, 0)); err != nil {
		t.Fatalf("put after free: %v", err)
	}
}

// TestReclaim: the repository asks for memory back; the client's handler
// frees pages and the repository sees them gone.
func TestReclaim(t *testing.T) {
	dir := repotest.PKI(t, "hostA")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 4 << 20})
	var mu sync.Mutex
	var held []repo.Cap
	var c *repo.Client
	c = client(t, dir, "hostA", r.Addr, repo.ClientConfig{OnReclaim: func(ctx context.Context, n int64) int64 {
		mu.Lock()
		k := min(int(n/repo.PageSize), len(held))
		give := held[:k]
		held = held[k:]
		mu.Unlock()
		freed, _ := c.Free(ctx, give)
		return int64(freed) * repo.PageSize
	}})
	ctx := ctxT(t)
	caps, err := c.Put(ctx, pages(100, 3))
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	held = caps
	mu.Unlock()
	got, err := r.Server.Reclaim(ctx, "hostA", 40*repo.PageSize)
	if err != nil || got != 40*repo.PageSize {
		t.Fatalf("reclaim: %d %v", got, err)
	}
	if st := r.Server.Status(); st.Used != 60*repo.PageSize {
		t.Fatalf("used %d after reclaiming 40 of 100 pages", st.Used)
	}
	if _, err := r.Server.Reclaim(ctx, "nobody", 1); err == nil {
		t.Fatal("reclaim from an unknown client succeeded")
	}
}

// cutter is a TCP proxy whose connections the test can cut, to break a
// client's connection without touching either end.
type cutter struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	down  bool // refuse new connections
}

func newCutter(t *testing.T, target string) *cutter {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cu := &cutter{ln: ln}
	t.Cleanup(func() { ln.Close(); cu.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			cu.mu.Lock()
			down := cu.down
			cu.mu.Unlock()
			if down {
				c.Close()
				continue
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			cu.mu.Lock()
			cu.conns = append(cu.conns, c, s)
			cu.mu.Unlock()
			go func() { io.Copy(s, c); s.Close() }()
			go func() { io.Copy(c, s); c.Close() }()
		}
	}()
	return cu
}

func (cu *cutter) setDown(d bool) {
	cu.mu.Lock()
	defer cu.mu.Unlock()
	cu.down = d
}

func (cu *cutter) cut() {
	cu.mu.Lock()
	defer cu.mu.Unlock()
	for _, c := range cu.conns {
		c.Close()
	}
	cu.conns = nil
}

// TestReconnect: a cut connection comes back by itself and finds its
// pages; a restarted repository comes back empty and says so.
func TestReconnect(t *testing.T) {
	dir := repotest.PKI(t, "hostA")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 4 << 20})
	cu := newCutter(t, r.Addr)
	c := client(t, dir, "hostA", cu.ln.Addr().String(), repo.ClientConfig{})
	ctx := ctxT(t)
	caps, err := c.Put(ctx, pages(4, 5))
	if err != nil {
		t.Fatal(err)
	}
	inst := c.Instance()
	cu.setDown(true)
	cu.cut()
	waitFor(t, "the client to notice the cut", func() bool { return !c.Connected() })
	if _, err := c.Put(ctx, page(1)); !errors.Is(err, repo.ErrUnavailable) {
		t.Fatalf("put while disconnected: %v, want ErrUnavailable", err)
	}
	cu.setDown(false)
	if err := c.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4*repo.PageSize)
	if p, err := c.Get(ctx, caps, buf); err != nil || !p[3] || !bytes.Equal(buf, pages(4, 5)) {
		t.Fatalf("pages after reconnect: %v %v", p, err)
	}
	if c.Instance() != inst {
		t.Fatal("instance changed without a restart")
	}

	r.Restart()
	waitFor(t, "the client to reach the restarted repository", func() bool { return c.Connected() && c.Instance() != inst })
	p, err := c.Get(ctx, caps, buf)
	if err != nil || p[0] {
		t.Fatalf("pages of a dead instance: %v %v", p, err)
	}
	if c.Status().Stored != 0 {
		t.Errorf("client still counts %d bytes stored on a restarted repository", c.Status().Stored)
	}
}

// TestOrphanedSessionFreed: a client that goes away for good leaves no
// pages behind once the orphan timeout passes.
func TestOrphanedSessionFreed(t *testing.T) {
	dir := repotest.PKI(t, "hostA")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 4 << 20, OrphanTimeout: 300 * time.Millisecond})
	c := client(t, dir, "hostA", r.Addr, repo.ClientConfig{})
	if _, err := c.Put(ctxT(t), pages(8, 0)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitFor(t, "orphaned pages to be freed", func() bool { st := r.Server.Status(); return st.Used == 0 && len(st.Clients) == 0 })
}

// TestRejectsBadPeers: no client certificate, a garbage frame, a request
// before Hello, and a wrong version are all refused.
func TestRejectsBadPeers(t *testing.T) {
	dir := repotest.PKI(t, "hostA")
	r := repotest.Start(t, dir, repo.ServerOptions{Capacity: 1 << 20})
	good := repotest.ClientTLS(t, dir, "hostA")

	noCert := good.Clone()
	noCert.Certificates = nil
	if c, err := tls.Dial("tcp", r.Addr, noCert); err == nil {
		// TLS 1.3 reports the rejection on the first read.
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("server accepted a client without a certificate")
		}
		c.Close()
	}

	for name, frame := range map[string][]byte{
		"garbage":      {0, 0, 0, 3, 0xff, 1, 2},
		"huge length":  {0xff, 0xff, 0xff, 0xff},
		"put first":    mustFrame(t, &repo.Put{ID: 1, Data: make([]byte, repo.PageSize)}),
		"version 2":    mustFrame(t, &repo.Hello{Version: 2}),
		"hello+trails": append(mustFrame(t, &repo.Hello{Version: 1}), 0, 0, 0, 1, byte(repo.TypeGet)),
	} {
		c, err := tls.Dial("tcp", r.Addr, good)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(frame)
		br := bufio.NewReader(c)
		var last repo.Message
		for range 3 {
			m, err := repo.ReadFrame(br)
			if err != nil {
				break
			}
			last = m
		}
		e, ok := last.(*repo.Error)
		if !ok || e.ID != 0 {
			t.Errorf("%s: last frame %#v, want a connection-ending Error", name, last)
		}
		c.Close()
	}
}

func mustFrame(t *testing.T, m repo.Message) []byte {
	b, err := repo.AppendFrame(nil, m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 300; i++ {
		if cond() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func sampleMessages() []repo.Message {
	return []repo.Message{
		&repo.Hello{Version: 1, Session: [16]byte{1, 2}},
		&repo.Welcome{Version: 1, Instance: [16]byte{3}, Quota: 1 << 30, Used: 4096, Available: 8192},
		&repo.Put{ID: 7, Data: make([]byte, 2*repo.PageSize)},
		&repo.Stored{ID: 7, Available: 4096, Caps: []repo.Cap{{1}, {2}}},
		&repo.Get{ID: 8, Caps: []repo.Cap{{1}, {2}, {3}}},
		&repo.Data{ID: 8, Present: []bool{true, false, true}, Data: make([]byte, 2*repo.PageSize)},
		&repo.Free{ID: 9, Caps: []repo.Cap{{1}}},
		&repo.Freed{ID: 9, Available: 1, N: 1},
		&repo.Reclaim{ID: 10, Bytes: 1 << 20},
		&repo.Reclaimed{ID: 10, Bytes: 4096},
		&repo.Error{ID: 11, Code: repo.CodeFull, Message: "full"},
	}
}

// FuzzDecode: Decode never panics, errors wrap ErrMalformed, and whatever
// it accepts encodes back to the same bytes.
func FuzzDecode(f *testing.F) {
	for _, m := range sampleMessages() {
		b, err := repo.AppendFrame(nil, m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[4:])
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		m, err := repo.Decode(body)
		if err != nil {
			if !errors.Is(err, repo.ErrMalformed) {
				t.Fatalf("error not wrapping ErrMalformed: %v", err)
			}
			return
		}
		b, err := repo.AppendFrame(nil, m)
		if err != nil {
			t.Fatalf("decoded message does not encode: %v", err)
		}
		if !bytes.Equal(b[4:], body) {
			t.Fatal("re-encoding differs")
		}
	})
}

// FuzzReadFrame feeds arbitrary streams to the frame reader.
func FuzzReadFrame(f *testing.F) {
	var s []byte
	for _, m := range sampleMessages() {
		s, _ = repo.AppendFrame(s, m)
	}
	f.Add(s)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := bufio.NewReader(bytes.NewReader(stream))
		for range 64 {
			if _, err := repo.ReadFrame(r); err != nil {
				return
			}
		}
	})
}
