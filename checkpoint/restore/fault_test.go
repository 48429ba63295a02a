package restore_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"hostd/checkpoint/memfs/memfstest"
	"hostd/checkpoint/restore"
)

// holdProxy forwards TCP connections to a backup, except that every
// connection after the first `pass` is accepted and then left unanswered
// (its bytes wait in the socket) until release: a restore's fault link
// (dialled by Open) works while its sweep link hangs with chunks in flight.
type holdProxy struct {
	t       *testing.T
	ln      net.Listener
	backend string
	pass    int

	mu       sync.Mutex
	n        int
	held     chan struct{} // closed when the first held connection arrives
	release  chan struct{}
	released bool
	conns    []net.Conn
	wg       sync.WaitGroup
}

func startHoldProxy(t *testing.T, backend string, pass int) *holdProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &holdProxy{t: t, ln: ln, backend: backend, pass: pass, held: make(chan struct{}), release: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *holdProxy) addr() string { return p.ln.Addr().String() }

func (p *holdProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.n++
		hold := p.n > p.pass
		if hold && p.n == p.pass+1 {
			close(p.held)
		}
		p.conns = append(p.conns, c)
		p.mu.Unlock()
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if hold {
				<-p.release
			}
			p.pipe(c)
		}()
	}
}

func (p *holdProxy) pipe(c net.Conn) {
	b, err := net.Dial("tcp", p.backend)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns = append(p.conns, b)
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { io.Copy(b, c); b.Close(); done <- struct{}{} }()
	go func() { io.Copy(c, b); c.Close(); done <- struct{}{} }()
	<-done
	<-done
}

func (p *holdProxy) releaseAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.released {
		p.released = true
		close(p.release)
	}
}

func (p *holdProxy) close() {
	p.ln.Close()
	p.releaseAll()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// TestFaultOvertakesPrefetchChunk: while the prefetcher's first chunks
// are in flight on a sweep link that does not answer, a guest process
// reads every page: its faults fetch their own pages on the fault link
// instead of waiting for the chunks. It then writes some pages; once the
// sweep link answers, the chunks land on pages the faults already brought
// and the preload runs over them: the guest's writes survive, every other
// page reads the restore point, and the cache file holds exactly the
// restore point (each page written once, whichever copy came first).
func TestFaultOvertakesPrefetchChunk(t *testing.T) {
	needRoot(t)
	b := startBackup(t)
	want := checkpoint(t, b, "vm1")
	orig := bytes.Clone(want)
	px := startHoldProxy(t, b.addr, 1)
	ev := &events{}
	cache := filepath.Join(t.TempDir(), "cache")
	r := open(t, b, "vm1", ev, func(c *restore.Config) {
		c.Backup = px.addr()
		c.CacheFile = cache
		// Nothing may time out while the sweep link is held: a fault that
		// waited for a held chunk would wait for the whole test.
		c.AttemptTimeout = 5 * time.Minute
	})
	fs := mountRestored(t, r)
	pctx, pcancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer pcancel()
	prefetched := make(chan error, 1)
	go func() { prefetched <- r.Run(pctx, fs) }()
	select {
	case <-px.held:
	case <-time.After(30 * time.Second):
		t.Fatal("the prefetcher never dialled its link")
	}
	// The sweep's first chunks are registered in flight before it dials.

	type result struct {
		res memfstest.Result
		err error
	}
	done := make(chan result, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	go func() {
		res, err := memfstest.Run(ctx, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", NoSync: true})
		done <- result{res, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(2 * time.Minute):
		px.releaseAll()
		t.Fatalf("guest still faulting 2 minutes after it started, with the sweep link held: faults wait for the held chunks (status %+v)", r.Status())
	}
	if res.err != nil {
		t.Fatal(res.err)
	}
	checkHash(t, "with the sweep link held", want, allPages(), res.res)
	st := r.Status()
	t.Logf("with the sweep link held: %+v", st)
	if st.PrefetchedBytes != 0 {
		t.Fatalf("the held link delivered %d bytes: the test proves nothing", st.PrefetchedBytes)
	}
	if st.PresentBytes != st.TotalBytes {
		t.Fatalf("present %d of %d after the guest read everything", st.PresentBytes, st.TotalBytes)
	}

	// Guest writes over pages the held chunks cover (the first windows of
	// the sweep, wherever they lie: every 16th page).
	var stamped []int64
	for p := int64(0); p < imgSize/4096/2; p += 16 {
		stamped = append(stamped, p)
		for i := p * 4096; i < (p+1)*4096; i++ {
			want[i] = 0xa5
		}
	}
	guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "stamp", Seed: 0xa5, Pages: stamped})

	px.releaseAll()
	if err := <-prefetched; err != nil {
		t.Fatalf("prefetch after the release: %v", err)
	}
	st = r.Status()
	t.Logf("after the release: %+v; memfs %+v", st, fs.Stats())
	if !st.FullyResident || ev.count(restore.EventResident) != 1 {
		t.Fatalf("not resident: %+v", st)
	}
	checkHash(t, "after the sweep's chunks landed", want, allPages(), guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", NoSync: true}))
	evict(t, fs.Path())
	checkHash(t, "after eviction", want, allPages(), guest(t, memfstest.Spec{Path: fs.Path(), Size: imgSize, Mode: "hash", NoSync: true}))

	got, err := os.ReadFile(cache)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, orig) {
		for p := int64(0); p < imgSize/4096; p++ {
			if pageCRC(got, p) != pageCRC(orig, p) {
				t.Fatalf("cache file page %d is not the restore point's", p)
			}
		}
	}
}
