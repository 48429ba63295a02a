package swapdev

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"hostd/dataplane/nbd"
	"hostd/dataplane/repo"
)

// PageSize is the unit of placement: each 4 KiB page of the device lives
// in one repository under one capability.
const PageSize = repo.PageSize

// RepoConfig names a page repository.
type RepoConfig struct {
	Addr string
	TLS  *tls.Config // the host's client config (pki.ClientConfig)
}

// Config describes a swap device.
type Config struct {
	// Path of the local write-through file; created if missing and sized
	// to Size. hostd keeps it beside the VM's other files and removes it
	// with the VM.
	Path string
	// Size of the device in bytes, a multiple of PageSize.
	Size int64
	// Repos to place pages in; none means a plain local swap file.
	Repos []RepoConfig
	// Preallocate reserves the whole local file at Open (ENOSPC then,
	// never later). Without it, space is reserved page by page on first
	// write, and a full disk fails that write with ENOSPC.
	Preallocate bool
	// Reuse keeps the content of an existing file (hostd restarted under
	// a running VM whose QEMU reconnects): every page is then read from
	// the file until rewritten. Without it the file is emptied.
	Reuse bool
	// QueueBytes bounds the writes waiting for the local file; a full
	// queue slows writers down. Default 64 MiB.
	QueueBytes int64
	// RemoteTimeout bounds one repository call; past it the device uses
	// its local copy. Default 2 s.
	RemoteTimeout time.Duration
	Logger        *slog.Logger
	// Retry bounds for reconnecting to repositories (defaults of repo).
	RetryMin, RetryMax time.Duration
}

// Device is a swap device: an nbd.Backend whose pages live in page
// repositories and, written through, in a local file.
type Device struct {
	cfg   Config
	log   *slog.Logger
	f     *os.File
	pages int
	repos []*repo.Client
	rr    atomic.Uint64 // round-robin among equally free repositories

	locks   [256]sync.RWMutex // page stripes: page i is guarded by locks[i%256]
	table   []entry
	alloc   []atomic.Uint64 // bit per page: its local blocks are reserved
	pending pendingMap
	q       *queue

	frees chan freeReq

	closeOnce sync.Once
	stop      context.CancelFunc
	bg        sync.WaitGroup

	st stats
}

// entry is one page's placement. Guarded by its stripe lock.
type entry struct {
	cap  repo.Cap
	repo int8 // index in repos, or -1: not in a repository
	data bool // written (else reads as zeros)
}

const noRepo = -1

var _ nbd.Backend = (*Device)(nil)

// Open creates or opens the local file and starts connecting to the
// repositories (in the background: a device works on its local file
// alone while none is reachable).
func Open(ctx context.Context, cfg Config) (*Device, error) {
	if cfg.Size <= 0 || cfg.Size%PageSize != 0 {
		return nil, fmt.Errorf("open swap device %s: size %d is not a positive multiple of %d", cfg.Path, cfg.Size, PageSize)
	}
	if len(cfg.Repos) > 100 {
		return nil, fmt.Errorf("open swap device %s: %d repositories is too many", cfg.Path, len(cfg.Repos))
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = 64 << 20
	}
	cfg.QueueBytes = max(cfg.QueueBytes, nbd.DefaultMaxRequest) // one whole request must fit
	if cfg.RemoteTimeout <= 0 {
		cfg.RemoteTimeout = 2 * time.Second
	}
	l := cfg.Logger
	if l == nil {
		l = slog.Default()
	}
	flags := os.O_RDWR | os.O_CREATE
	if !cfg.Reuse {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(cfg.Path, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open swap device: %w", err)
	}
	if err := f.Truncate(cfg.Size); err != nil {
		f.Close()
		return nil, fmt.Errorf("open swap device: size %s: %w", cfg.Path, err)
	}
	n := int(cfg.Size / PageSize)
	d := &Device{
		cfg: cfg, log: l.With("component", "swapdev", "path", cfg.Path), f: f, pages: n,
		table: make([]entry, n), alloc: make([]atomic.Uint64, (n+63)/64),
		pending: pendingMap{m: map[int]pendingPage{}},
		frees:   make(chan freeReq, 256),
	}
	d.st.init()
	for i := range d.table {
		d.table[i] = entry{repo: noRepo, data: cfg.Reuse}
	}
	if cfg.Reuse {
		d.st.local.Store(int64(n))
	}
	if cfg.Preallocate {
		if err := unix.Fallocate(int(f.Fd()), 0, 0, cfg.Size); err != nil {
			f.Close()
			return nil, fmt.Errorf("open swap device: reserve %d bytes for %s: %w (free disk space or make the device smaller)", cfg.Size, cfg.Path, err)
		}
		for i := range d.alloc {
			d.alloc[i].Store(^uint64(0))
		}
	}
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d.stop = cancel
	d.q = newQueue(cfg.QueueBytes)
	d.bg.Add(2)
	go func() { defer d.bg.Done(); d.writeLoop() }()
	go func() { defer d.bg.Done(); d.freeLoop(bctx) }()
	for i, rc := range cfg.Repos {
		c, err := repo.NewClient(repo.ClientConfig{
			Addr: rc.Addr, TLS: rc.TLS, Logger: l, RetryMin: cfg.RetryMin, RetryMax: cfg.RetryMax,
			OnReclaim: func(ctx context.Context, bytes int64) int64 { return d.reclaim(ctx, i, bytes) },
		})
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("open swap device: %w", err)
		}
		d.repos = append(d.repos, c)
	}
	return d, nil
}

// Size is the device size.
func (d *Device) Size() int64 { return d.cfg.Size }

// Repos are the device's repository clients (status, WaitConnected).
func (d *Device) Repos() []*repo.Client { return d.repos }

// Close flushes the local file, frees the device's pages in the
// repositories and closes everything. It does not remove the file.
func (d *Device) Close() error {
	var err error
	d.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err = d.Flush(ctx)
		// Give the repositories their memory back now rather than at
		// their orphan timeout.
		byRepo := map[int8][]repo.Cap{}
		for i := range d.table {
			l := d.lock(i)
			l.Lock()
			if e := d.table[i]; e.repo != noRepo {
				byRepo[e.repo] = append(byRepo[e.repo], e.cap)
			}
			l.Unlock()
		}
		for r, caps := range byRepo {
			d.repos[r].Free(ctx, caps)
		}
		d.q.close()
		d.stop()
		d.bg.Wait()
		for _, c := range d.repos {
			c.Close()
		}
		if cerr := d.f.Close(); err == nil {
			err = cerr
		}
	})
	return err
}

func (d *Device) lock(page int) *sync.RWMutex { return &d.locks[page%len(d.locks)] }

// lockPages locks the stripes of pages [p0, p1] in ascending stripe order
// (no deadlock between overlapping requests) and returns the unlock.
func (d *Device) lockPages(p0, p1 int, write bool) func() {
	n := len(d.locks)
	var idx []int
	if p1-p0+1 >= n {
		idx = make([]int, n)
		for i := range idx {
			idx[i] = i
		}
	} else {
		s0, s1 := p0%n, p1%n
		if s0 <= s1 {
			for s := s0; s <= s1; s++ {
				idx = append(idx, s)
			}
		} else { // wrapped: ascending order is 0..s1 then s0..n-1
			for s := 0; s <= s1; s++ {
				idx = append(idx, s)
			}
			for s := s0; s < n; s++ {
				idx = append(idx, s)
			}
		}
	}
	for _, s := range idx {
		if write {
			d.locks[s].Lock()
		} else {
			d.locks[s].RLock()
		}
	}
	return func() {
		for _, s := range idx {
			if write {
				d.locks[s].Unlock()
			} else {
				d.locks[s].RUnlock()
			}
		}
	}
}

// setEntry changes a page's placement and keeps the page counters right.
// Its stripe lock is held.
func (d *Device) setEntry(i int, e entry) {
	old := d.table[i]
	d.table[i] = e
	d.st.count(old, -1)
	d.st.count(e, +1)
}

// ReadAt reads whole or partial pages: from the write-through queue for
// pages not yet on disk, from the repositories, and from the local file
// for pages that are local only or that a repository cannot give back.
func (d *Device) ReadAt(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	p0, p1 := int(off/PageSize), int((off+int64(len(p))-1)/PageSize)
	unlock := d.lockPages(p0, p1, false)
	var err error
	var missed []missedPage
	if off%PageSize == 0 && len(p)%PageSize == 0 {
		missed, err = d.readPages(ctx, p0, p)
	} else {
		buf := make([]byte, (p1-p0+1)*PageSize)
		missed, err = d.readPages(ctx, p0, buf)
		copy(p, buf[off-int64(p0)*PageSize:])
	}
	unlock()
	d.forget(missed)
	d.st.op(&d.st.reads, &d.st.readBytes, len(p), &d.st.readLat, start, err)
	if err != nil {
		return fmt.Errorf("swap read at %d: %w", off, err)
	}
	return nil
}

type missedPage struct {
	page int
	cap  repo.Cap
}

// readPages fills buf with pages p0... Stripe locks are held (read).
func (d *Device) readPages(ctx context.Context, p0 int, buf []byte) ([]missedPage, error) {
	n := len(buf) / PageSize
	type want struct {
		idx  []int
		caps []repo.Cap
	}
	remote := map[int8]*want{}
	var local []int
	for k := 0; k < n; k++ {
		i := p0 + k
		dst := buf[k*PageSize : (k+1)*PageSize]
		if d.pending.get(i, dst) {
			d.st.pagesQueue.Add(1)
			continue
		}
		e := d.table[i]
		switch {
		case !e.data:
			clear(dst)
		case e.repo != noRepo:
			w := remote[e.repo]
			if w == nil {
				w = &want{}
				remote[e.repo] = w
			}
			w.idx = append(w.idx, k)
			w.caps = append(w.caps, e.cap)
		default:
			local = append(local, k)
		}
	}
	var missed []missedPage
	var mu sync.Mutex
	var wg sync.WaitGroup
	for r, w := range remote {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tmp := make([]byte, len(w.caps)*PageSize)
			rctx, cancel := context.WithTimeout(ctx, d.cfg.RemoteTimeout)
			present, err := d.repos[r].Get(rctx, w.caps, tmp)
			cancel()
			mu.Lock()
			defer mu.Unlock()
			for j, k := range w.idx {
				if err == nil && present[j] {
					copy(buf[k*PageSize:], tmp[j*PageSize:(j+1)*PageSize])
					d.st.pagesRemote.Add(1)
					continue
				}
				local = append(local, k)
				if err == nil { // the repository no longer has it (restart, reclaim)
					missed = append(missed, missedPage{p0 + k, w.caps[j]})
				}
			}
			if err != nil {
				d.st.remoteErrors.Add(1)
				d.log.Debug("repository read failed; using the local copy", "repo", d.repos[r].Addr(), "err", err)
			}
		}()
	}
	wg.Wait()
	for _, k := range local {
		dst := buf[k*PageSize : (k+1)*PageSize]
		// A page can have left the queue while a repository answered: it
		// is then on disk, or it is still in the queue; try the queue
		// first again.
		if d.pending.get(p0+k, dst) {
			continue
		}
		if _, err := d.f.ReadAt(dst, int64(p0+k)*PageSize); err != nil {
			return missed, fmt.Errorf("read local copy of page %d: %w", p0+k, err)
		}
		d.st.pagesLocal.Add(1)
	}
	return missed, nil
}

// forget marks pages that a repository no longer holds as local only, so
// that they are not asked for again.
func (d *Device) forget(missed []missedPage) {
	for _, m := range missed {
		l := d.lock(m.page)
		l.Lock()
		if e := d.table[m.page]; e.repo != noRepo && e.cap == m.cap {
			d.setEntry(m.page, entry{repo: noRepo, data: true})
		}
		l.Unlock()
	}
}

// WriteAt stores p: space on the local disk is reserved first (a full disk
// fails the write here, before anything changed), the pages are queued for
// the local file, and put in a repository; the write returns when the
// repository has them (or could not take them: the local copy is then the
// only one). With fua it also waits until the local copy is durable.
func (d *Device) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	start := time.Now()
	err := d.write(ctx, p, off, fua)
	d.st.op(&d.st.writes, &d.st.writeBytes, len(p), &d.st.writeLat, start, err)
	if err != nil {
		return fmt.Errorf("swap write at %d: %w", off, err)
	}
	return nil
}

func (d *Device) write(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := d.q.failed(); err != nil {
		return err
	}
	p0, p1 := int(off/PageSize), int((off+int64(len(p))-1)/PageSize)
	unlock := d.lockPages(p0, p1, true)
	defer unlock()
	n := p1 - p0 + 1
	buf := p
	if off%PageSize != 0 || len(p)%PageSize != 0 {
		// Partial pages: merge with their current content.
		buf = make([]byte, n*PageSize)
		first, last := p0, p1
		if _, err := d.readPages(ctx, first, buf[:PageSize]); err != nil {
			return err
		}
		if last != first {
			if _, err := d.readPages(ctx, last, buf[(n-1)*PageSize:]); err != nil {
				return err
			}
		}
		copy(buf[off-int64(p0)*PageSize:], p)
	}
	if err := d.reserve(p0, n); err != nil {
		return err
	}
	seq, err := d.q.push(ctx, int64(p0)*PageSize, buf, &d.pending, p0)
	if err != nil {
		return err
	}
	var caps []repo.Cap
	r := d.pick(len(buf))
	if r >= 0 {
		rctx, cancel := context.WithTimeout(ctx, d.cfg.RemoteTimeout)
		caps, err = d.repos[r].Put(rctx, buf)
		cancel()
		if err != nil {
			if !errors.Is(err, repo.ErrFull) {
				d.st.remoteErrors.Add(1)
			}
			d.log.Debug("repository write failed; page stays local only", "repo", d.repos[r].Addr(), "err", err)
			caps = nil
		}
	}
	old := map[int8][]repo.Cap{}
	for k := 0; k < n; k++ {
		i := p0 + k
		if e := d.table[i]; e.repo != noRepo {
			old[e.repo] = append(old[e.repo], e.cap)
		}
		if caps != nil {
			d.setEntry(i, entry{cap: caps[k], repo: int8(r), data: true})
		} else {
			d.setEntry(i, entry{repo: noRepo, data: true})
		}
	}
	d.freeLater(ctx, old)
	if fua {
		return d.q.durable(ctx, seq, d.f)
	}
	return nil
}

// pick chooses the connected repository with the most room for n bytes,
// round robin among ties; -1 if none has room.
func (d *Device) pick(n int) int {
	best, bestAvail := -1, int64(n)-1
	k := len(d.repos)
	start := int(d.rr.Add(1))
	for j := 0; j < k; j++ {
		i := (start + j) % k
		c := d.repos[i]
		if !c.Connected() {
			continue
		}
		if a := c.Available(); a > bestAvail {
			best, bestAvail = i, a
		}
	}
	return best
}

// reserve makes sure pages [p0, p0+n) have blocks in the local file, so
// that the asynchronous write-through cannot hit a full disk.
func (d *Device) reserve(p0, n int) error {
	missing := false
	for i := p0; i < p0+n; i++ {
		if d.alloc[i/64].Load()&(1<<(i%64)) == 0 {
			missing = true
			break
		}
	}
	if !missing {
		return nil
	}
	if err := unix.Fallocate(int(d.f.Fd()), 0, int64(p0)*PageSize, int64(n)*PageSize); err != nil {
		return fmt.Errorf("reserve local space for the swap pages: %w", err)
	}
	for i := p0; i < p0+n; i++ {
		d.alloc[i/64].Or(1 << (i % 64))
	}
	return nil
}

// Trim forgets whole pages of the range everywhere: in the repositories,
// and in the local file (a hole punched, in order with queued writes).
// Partial pages at the edges keep their content (NBD allows either).
func (d *Device) Trim(ctx context.Context, off, length int64) error {
	d.st.trims.Add(1)
	p0 := int((off + PageSize - 1) / PageSize)
	p1 := int((off+length)/PageSize) - 1
	if p1 < p0 {
		return nil
	}
	unlock := d.lockPages(p0, p1, true)
	defer unlock()
	old := map[int8][]repo.Cap{}
	for i := p0; i <= p1; i++ {
		if e := d.table[i]; e.repo != noRepo {
			old[e.repo] = append(old[e.repo], e.cap)
		}
		d.setEntry(i, entry{repo: noRepo})
		d.alloc[i/64].And(^(uint64(1) << (i % 64)))
	}
	d.freeLater(ctx, old)
	if _, err := d.q.pushTrim(ctx, int64(p0)*PageSize, int64(p1-p0+1)*PageSize, &d.pending, p0, p1-p0+1); err != nil {
		return fmt.Errorf("swap trim at %d: %w", off, err)
	}
	return nil
}

// Flush waits until every write completed before it is on the local disk.
func (d *Device) Flush(ctx context.Context) error {
	d.st.flushes.Add(1)
	if err := d.q.durable(ctx, d.q.last(), d.f); err != nil {
		return fmt.Errorf("swap flush: %w", err)
	}
	return nil
}

type freeReq struct {
	repo int8
	caps []repo.Cap
}

// freeLater hands superseded capabilities to the free loop: freeing is not
// on a write's critical path.
func (d *Device) freeLater(ctx context.Context, old map[int8][]repo.Cap) {
	for r, caps := range old {
		select {
		case d.frees <- freeReq{r, caps}:
		case <-ctx.Done():
			return
		}
	}
}

func (d *Device) freeLoop(ctx context.Context) {
	for {
		var batch = map[int8][]repo.Cap{}
		select {
		case f := <-d.frees:
			batch[f.repo] = append(batch[f.repo], f.caps...)
		case <-ctx.Done():
			return
		}
	more:
		for range 64 {
			select {
			case f := <-d.frees:
				batch[f.repo] = append(batch[f.repo], f.caps...)
			default:
				break more
			}
		}
		for r, caps := range batch {
			fctx, cancel := context.WithTimeout(ctx, 10*d.cfg.RemoteTimeout)
			if _, err := d.repos[r].Free(fctx, caps); err != nil {
				// Unfreed pages go back to the repository when this
				// session ends (orphan timeout) or the repository restarts.
				d.log.Debug("free superseded pages", "repo", d.repos[r].Addr(), "pages", len(caps), "err", err)
			}
			cancel()
		}
	}
}

// reclaim answers repository r's request for bytes back: the local copy is
// made durable, then pages are dropped from r until enough are freed.
func (d *Device) reclaim(ctx context.Context, r int, bytes int64) int64 {
	if err := d.Flush(ctx); err != nil {
		d.log.Warn("reclaim: local copy not durable; giving nothing back", "err", err)
		return 0
	}
	want := int((bytes + PageSize - 1) / PageSize)
	var caps []repo.Cap
	for s := range d.locks {
		if len(caps) >= want {
			break
		}
		d.locks[s].Lock()
		for i := s; i < d.pages && len(caps) < want; i += len(d.locks) {
			if e := d.table[i]; e.repo == int8(r) {
				caps = append(caps, e.cap)
				d.setEntry(i, entry{repo: noRepo, data: true})
			}
		}
		d.locks[s].Unlock()
	}
	n, err := d.repos[r].Free(ctx, caps)
	if err != nil {
		d.log.Warn("reclaim: free", "err", err)
	}
	d.st.reclaimed.Add(uint64(len(caps)))
	return int64(n) * PageSize
}
