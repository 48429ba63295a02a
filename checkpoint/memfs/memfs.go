package memfs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"hostd/checkpoint/bdi"
	"hostd/checkpoint/pageset"
)

// PageSize is the unit of the dirty-page stream.
const PageSize = 4096

// Sink receives the dirty-page stream.
type Sink interface {
	// WritePages takes page data at a file offset (page aligned). data is
	// only valid during the call. Calls come from one goroutine, in the
	// order the kernel wrote the pages back.
	WritePages(ctx context.Context, off int64, data []byte) error
	// Flush is called by the barrier after every queued write has been
	// delivered: push out whatever the sink buffers.
	Flush(ctx context.Context) error
}

// Source provides pages that are not in the page cache.
type Source interface {
	// ReadPages fills p with the pages at off (page aligned).
	ReadPages(ctx context.Context, off int64, p []byte) error
}

// ZeroSource serves zero pages: a fresh VM's memory.
type ZeroSource struct{}

// ReadPages zeroes p.
func (ZeroSource) ReadPages(_ context.Context, _ int64, p []byte) error {
	clear(p)
	return nil
}

// Options configure a mount.
type Options struct {
	Size     int64  // file size, a positive multiple of PageSize
	FileName string // default "ram"
	Sink     Sink   // required
	Source   Source // default ZeroSource
	// QueueBytes bounds the copied, undelivered writes; default 8 MiB.
	QueueBytes int64
	// MaxWrite is the largest FUSE write (and read); default 1 MiB, the
	// kernel's limit.
	MaxWrite int
	// NoPin leaves written pages evictable (see doc.go); for measuring
	// what pinning costs.
	NoPin bool
	// NoWritebackCache turns FUSE's writeback cache off (it only affects
	// write(2); mmap writes always go through the page cache).
	NoWritebackCache bool
	// DirtyCap is the initial cap (see SetDirtyCap); default 64 MiB.
	DirtyCap int64
	// ReadAhead bounds the kernel's read-ahead and a page fault's
	// read-around on the file (one READ per fault brings this much);
	// default 128 KiB, the kernel's most. A lazy restore may want less:
	// each fault then waits for fewer bytes from the backup.
	ReadAhead int
	Logger    *slog.Logger
}

const (
	rootIno = 1
	fileIno = 2
	// attrTTL: nothing but this process changes the attributes, so the
	// kernel may cache them for as long as it likes.
	attrTTL = time.Hour
)

// FS is a mounted RAM file.
type FS struct {
	fuse.RawFileSystem
	opts   Options
	log    *slog.Logger
	dir    string
	srv    *fuse.Server
	bdi    bdi.Dev
	mtime  time.Time
	ctx    context.Context // ends at unmount; sinks and sources see it
	cancel context.CancelFunc

	q       *byteSem
	items   chan item
	pools   [11]sync.Pool // size classes 4 KiB .. 4 MiB
	workEnd chan struct{}

	// pin is a read-only mapping of the file in this process, used only as
	// an address range for mlock(2): never touch its bytes (see doc.go).
	pin       []byte
	pinned    *pageset.Set // pages handed to the pinner (locked or failed)
	toPin     *pageset.Set // pages the pinner has yet to lock
	pinKick   chan struct{}
	pinCancel context.CancelFunc
	pinEnd    chan struct{}
	pinWarned bool

	mu        sync.Mutex
	cond      *sync.Cond
	enqueued  uint64
	delivered uint64
	sinkErr   error // first sink error since the last barrier
	written   *pageset.Set
	// served holds the pages a READ was answered for (marked before the
	// Source is asked): the kernel may hold them, and with the guest's
	// stores since, so nothing may push an older copy over them.
	served   *pageset.Set
	preloadF *os.File // read handle for Preload, FADV_RANDOM; nil until used
	stats    Stats
	capBytes int64
	closed   bool
}

type item struct {
	off  int64
	buf  []byte
	full []byte // pooled buffer buf was cut from
	seq  uint64
}

// Stats are the mount's counters.
type Stats struct {
	Writes         int64 // FUSE writes taken
	BytesWritten   int64
	BytesDelivered int64 // handed to the sink
	SinkErrors     int64
	Reads          int64 // FUSE reads served from the Source
	BytesRead      int64
	Unaligned      int64 // writes refused for not being page aligned
	QueueBlocked   int64 // writes that had to wait for queue space
	Barriers       int64
	PinnedBytes    int64 // written pages locked in the page cache
	PinFailures    int64
	PreloadedBytes int64 // pages Preload had the kernel read in
	PreloadSkipped int64 // pages Preload left alone: already served or written
}

// Mount mounts a new memfs on dir (which must exist) and serves it until
// Unmount. It needs root (a direct mount).
func Mount(ctx context.Context, dir string, opts Options) (*FS, error) {
	op := "mount memfs on " + dir
	if opts.Size <= 0 || opts.Size%PageSize != 0 {
		return nil, fmt.Errorf("%s: size %d not a positive multiple of %d", op, opts.Size, PageSize)
	}
	if opts.Sink == nil {
		return nil, fmt.Errorf("%s: no sink", op)
	}
	if opts.Source == nil {
		opts.Source = ZeroSource{}
	}
	if opts.FileName == "" {
		opts.FileName = "ram"
	}
	if opts.MaxWrite == 0 {
		opts.MaxWrite = 1 << 20
	}
	if opts.QueueBytes == 0 {
		opts.QueueBytes = 8 << 20
	}
	if opts.QueueBytes < int64(opts.MaxWrite) {
		return nil, fmt.Errorf("%s: queue of %d bytes cannot hold one write of %d", op, opts.QueueBytes, opts.MaxWrite)
	}
	if opts.DirtyCap == 0 {
		opts.DirtyCap = 64 << 20
	}
	if opts.ReadAhead == 0 {
		opts.ReadAhead = 128 << 10
	}
	if opts.ReadAhead < PageSize || opts.ReadAhead%PageSize != 0 {
		return nil, fmt.Errorf("%s: read-ahead %d not a positive multiple of %d", op, opts.ReadAhead, PageSize)
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	fs := &FS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		opts:          opts,
		log:           l.With("component", "memfs", "mount", dir),
		dir:           dir,
		mtime:         time.Now(),
		ctx:           fctx,
		cancel:        cancel,
		q:             newByteSem(opts.QueueBytes),
		items:         make(chan item, opts.QueueBytes/PageSize),
		workEnd:       make(chan struct{}),
		written:       pageset.New(opts.Size / PageSize),
		served:        pageset.New(opts.Size / PageSize),
	}
	fs.cond = sync.NewCond(&fs.mu)
	var extra uint64
	if !opts.NoWritebackCache {
		extra = fuse.CAP_WRITEBACK_CACHE
	}
	srv, err := fuse.NewServer(fs, dir, &fuse.MountOptions{
		FsName:            "hostd-memfs",
		Name:              "memfs",
		DirectMount:       true,
		AllowOther:        true, // QEMU may run as another user
		Options:           []string{"default_permissions"},
		MaxWrite:          opts.MaxWrite,
		MaxReadAhead:      opts.ReadAhead,
		MaxBackground:     64,
		ExtraCapabilities: extra,
		// The data of the file changes only through the kernel, so its
		// page cache must never be dropped because an attribute changed.
		ExplicitDataCacheControl: true,
		DisableXAttrs:            true,
		Logger:                   slog.NewLogLogger(l.Handler(), slog.LevelWarn),
	})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	fs.srv = srv
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		srv.Unmount()
		cancel()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	go fs.deliver()
	if fs.bdi, err = bdi.Of(dir); err != nil {
		fs.Unmount()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := fs.bdi.SetStrictLimit(true); err != nil {
		fs.Unmount()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := fs.SetDirtyCap(opts.DirtyCap); err != nil {
		fs.Unmount()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if !opts.NoPin {
		if err := fs.mapForPinning(); err != nil {
			fs.Unmount()
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	fs.log.Info("mounted", "size", opts.Size, "bdi", fs.bdi.Name, "max_write", opts.MaxWrite, "writeback_cache", !opts.NoWritebackCache)
	return fs, nil
}

// Path is the RAM file's path.
func (fs *FS) Path() string { return filepath.Join(fs.dir, fs.opts.FileName) }

// BDI is the mount's backing device.
func (fs *FS) BDI() bdi.Dev { return fs.bdi }

// QueueBytes is the capacity of the write queue.
func (fs *FS) QueueBytes() int64 { return fs.opts.QueueBytes }

// SetDirtyCap bounds the mount's unflushed memory to capBytes: the bdi's
// dirty + writeback pages get capBytes minus the queue. The kernel applies
// it as a share of the global dirty limit, so the effective value is read
// back and returned by DirtyLimit.
func (fs *FS) SetDirtyCap(capBytes int64) error {
	op := fmt.Sprintf("set dirty cap of %s to %d", fs.dir, capBytes)
	limit := capBytes - fs.opts.QueueBytes
	if limit < 1<<20 {
		return fmt.Errorf("%s: leaves %d bytes for dirty pages after a %d-byte queue, need at least 1 MiB", op, limit, fs.opts.QueueBytes)
	}
	if err := fs.bdi.SetMaxBytes(limit); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	fs.mu.Lock()
	fs.capBytes = capBytes
	fs.mu.Unlock()
	return nil
}

// DirtyLimit reads the bdi's effective max_bytes.
func (fs *FS) DirtyLimit() (int64, error) { return fs.bdi.MaxBytes() }

// Stats returns the counters.
func (fs *FS) Stats() Stats {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.stats
}

// Written is a copy of the set of pages ever written back, which the
// daemon cannot serve again from its Source.
func (fs *FS) Written() *pageset.Set {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	c := pageset.New(fs.written.Len())
	c.Union(fs.written)
	return c
}

// Barrier waits until every write taken so far is delivered to the sink,
// then flushes the sink. It returns the first sink error since the last
// barrier. fsync on the file does the same after the kernel's writeback.
func (fs *FS) Barrier(ctx context.Context) error {
	fs.mu.Lock()
	target := fs.enqueued
	stop := context.AfterFunc(ctx, func() {
		fs.mu.Lock()
		fs.cond.Broadcast()
		fs.mu.Unlock()
	})
	defer stop()
	for fs.delivered < target && ctx.Err() == nil && !fs.closed {
		fs.cond.Wait()
	}
	err := fs.sinkErr
	fs.sinkErr = nil
	fs.stats.Barriers++
	undelivered := fs.closed && fs.delivered < target
	fs.mu.Unlock()
	if e := ctx.Err(); e != nil {
		return fmt.Errorf("memfs barrier: %w", e)
	}
	if undelivered {
		return fmt.Errorf("memfs barrier: unmounted with writes undelivered")
	}
	if err != nil {
		return fmt.Errorf("memfs barrier: sink failed: %w", err)
	}
	if err := fs.opts.Sink.Flush(ctx); err != nil {
		return fmt.Errorf("memfs barrier: flush sink: %w", err)
	}
	return nil
}

// Sync is the complete flush of a pause: fsync of the RAM file, so the
// kernel writes back every dirty page (each one queued by Write) and the
// FSYNC handler runs Barrier. It takes at most about the dirty cap over the
// sink's bandwidth. If ctx ends first Sync returns; the fsync goes on.
func (fs *FS) Sync(ctx context.Context) error {
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(fs.Path(), os.O_RDWR, 0)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		done <- f.Sync()
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("memfs sync %s: %w", fs.Path(), err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("memfs sync %s: %w", fs.Path(), ctx.Err())
	}
}

// Unmount detaches the filesystem and stops delivery after the queue has
// drained to the sink.
func (fs *FS) Unmount() error {
	if fs.pinCancel != nil {
		// The pinner may sit in mlock waiting for a page the kernel is
		// writing back; the FUSE server still runs, so that ends.
		fs.pinCancel()
		<-fs.pinEnd
	}
	fs.mu.Lock()
	pin := fs.pin
	fs.pin = nil
	pf := fs.preloadF
	fs.preloadF = nil
	fs.mu.Unlock()
	if pf != nil {
		pf.Close()
	}
	if pin != nil {
		// A syscall, so safe for this process: unmapping writes back
		// through our own FUSE server, which is still running.
		unix.Munmap(pin)
	}
	err := fs.srv.Unmount()
	if err != nil {
		// A busy mount (the file still mapped) cannot go cleanly; detach
		// it so the kernel finishes when the last user goes.
		if e := syscall.Unmount(fs.dir, syscall.MNT_DETACH); e == nil {
			err = nil
		}
	}
	fs.mu.Lock()
	if !fs.closed {
		fs.closed = true
		close(fs.items)
	}
	fs.cond.Broadcast()
	fs.mu.Unlock()
	<-fs.workEnd
	fs.cancel()
	if err != nil {
		return fmt.Errorf("unmount memfs %s: %w", fs.dir, err)
	}
	return nil
}

// deliver is the single consumer of the queue: ordering to the sink is
// the kernel's writeback order.
func (fs *FS) deliver() {
	defer close(fs.workEnd)
	for it := range fs.items {
		err := fs.opts.Sink.WritePages(fs.ctx, it.off, it.buf)
		fs.put(it.full)
		fs.q.release(int64(len(it.buf)))
		fs.mu.Lock()
		fs.delivered = it.seq
		if err != nil {
			fs.stats.SinkErrors++
			if fs.sinkErr == nil {
				fs.log.Warn("sink failed; pages stay owed by the sink", "off", it.off, "len", len(it.buf), "err", err)
				fs.sinkErr = err
			}
		} else {
			fs.stats.BytesDelivered += int64(len(it.buf))
		}
		fs.cond.Broadcast()
		fs.mu.Unlock()
	}
}

func sizeClass(n int) int {
	if n <= PageSize {
		return 0
	}
	return bits.Len(uint(n-1)) - 12
}

func (fs *FS) get(n int) []byte {
	c := sizeClass(n)
	if c >= len(fs.pools) {
		return make([]byte, n)
	}
	if b, ok := fs.pools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, PageSize<<c)
}

func (fs *FS) put(b []byte) {
	c := sizeClass(cap(b))
	if c < len(fs.pools) && cap(b) == PageSize<<c {
		fs.pools[c].Put(&b)
	}
}

// --- FUSE operations ---

func (fs *FS) String() string { return "hostd-memfs" }

func (fs *FS) fileAttr(a *fuse.Attr) {
	a.Ino = fileIno
	a.Size = uint64(fs.opts.Size)
	a.Blocks = uint64(fs.opts.Size) / 512
	a.Mode = syscall.S_IFREG | 0o600
	a.Nlink = 1
	a.Blksize = PageSize
	t := uint64(fs.mtime.Unix())
	a.Atime, a.Mtime, a.Ctime = t, t, t
}

func (fs *FS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != rootIno || name != fs.opts.FileName {
		return fuse.ENOENT
	}
	out.NodeId = fileIno
	out.Generation = 1
	out.SetEntryTimeout(attrTTL)
	out.SetAttrTimeout(attrTTL)
	fs.fileAttr(&out.Attr)
	return fuse.OK
}

func (fs *FS) Forget(uint64, uint64) {}

func (fs *FS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	out.SetTimeout(attrTTL)
	switch in.NodeId {
	case rootIno:
		out.Ino = rootIno
		out.Mode = syscall.S_IFDIR | 0o755
		out.Nlink = 2
		t := uint64(fs.mtime.Unix())
		out.Atime, out.Mtime, out.Ctime = t, t, t
	case fileIno:
		fs.fileAttr(&out.Attr)
	default:
		return fuse.ENOENT
	}
	return fuse.OK
}

// SetAttr accepts only what changes nothing: the size is fixed (a guest's
// RAM does not grow), times are ignored.
func (fs *FS) SetAttr(c <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId != fileIno {
		return fuse.EPERM
	}
	if sz, ok := in.GetSize(); ok && sz != uint64(fs.opts.Size) {
		return fuse.EPERM
	}
	if _, ok := in.GetMode(); ok {
		return fuse.EPERM
	}
	return fs.GetAttr(c, &fuse.GetAttrIn{InHeader: in.InHeader}, out)
}

func (fs *FS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != fileIno {
		return fuse.EISDIR
	}
	if in.Flags&syscall.O_TRUNC != 0 {
		return fuse.EPERM
	}
	// Keep the page cache across opens: it *is* the guest's memory.
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

func (fs *FS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != rootIno {
		return fuse.ENOTDIR
	}
	return fuse.OK
}

func (fs *FS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	if in.Offset == 0 {
		out.AddDirEntry(fuse.DirEntry{Name: fs.opts.FileName, Ino: fileIno, Mode: syscall.S_IFREG, Off: 1})
	}
	return fuse.OK
}

func (fs *FS) ReadDirPlus(c <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	if in.Offset == 0 {
		e := out.AddDirLookupEntry(fuse.DirEntry{Name: fs.opts.FileName, Ino: fileIno, Mode: syscall.S_IFREG, Off: 1})
		if e != nil {
			fs.Lookup(c, &fuse.InHeader{NodeId: rootIno}, fs.opts.FileName, e)
		}
	}
	return fuse.OK
}

func (fs *FS) ReleaseDir(*fuse.ReleaseIn) {}

func (fs *FS) Release(<-chan struct{}, *fuse.ReleaseIn) {}

func (fs *FS) Flush(<-chan struct{}, *fuse.FlushIn) fuse.Status { return fuse.OK }

func (fs *FS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = PageSize
	out.Frsize = PageSize
	out.Blocks = uint64(fs.opts.Size / PageSize)
	out.Files = 1
	out.NameLen = 255
	return fuse.OK
}

// Write is writeback arriving: copy, queue, return. Blocking here when the
// queue is full is the throttle.
func (fs *FS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	off, n := int64(in.Offset), len(data)
	if in.NodeId != fileIno {
		return 0, fuse.EBADF
	}
	if off < 0 || off+int64(n) > fs.opts.Size {
		return 0, fuse.Status(syscall.EFBIG)
	}
	if off%PageSize != 0 || n%PageSize != 0 {
		// The sink and the backup deal in whole pages; with the writeback
		// cache (and always for mmap) the kernel writes whole pages.
		fs.mu.Lock()
		fs.stats.Unaligned++
		fs.mu.Unlock()
		fs.log.Warn("refusing unaligned write", "off", off, "len", n)
		return 0, fuse.EINVAL
	}
	if n == 0 {
		return 0, fuse.OK
	}
	blocked, err := fs.q.acquire(int64(n), cancel)
	if err != nil {
		return 0, fuse.EINTR
	}
	buf := fs.get(n)
	copy(buf, data)
	fs.mu.Lock()
	if fs.closed {
		fs.mu.Unlock()
		fs.q.release(int64(n))
		return 0, fuse.EIO
	}
	fs.enqueued++
	seq := fs.enqueued
	fs.written.AddRange(off/PageSize, int64(n/PageSize))
	fs.stats.Writes++
	fs.stats.BytesWritten += int64(n)
	if blocked {
		fs.stats.QueueBlocked++
	}
	// Sending under mu keeps channel order equal to seq order; the channel
	// has room for every item the byte semaphore admits, so this never
	// blocks.
	fs.items <- item{off: off, buf: buf, full: buf, seq: seq}
	fs.mu.Unlock()
	fs.schedulePin(off/PageSize, int64(n/PageSize))
	return uint32(n), fuse.OK
}

// mapForPinning maps the file read-only into this process. The mapping is
// only ever passed to mlock, which faults pages in inside the system call;
// a Go thread in a system call does not block the garbage collector, so
// the pages' FUSE traffic is served normally.
func (fs *FS) mapForPinning() error {
	f, err := os.Open(fs.Path())
	if err != nil {
		return fmt.Errorf("open file for pinning: %w", err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, int(fs.opts.Size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map file for pinning: %w", err)
	}
	fs.pin = m
	fs.pinned = pageset.New(fs.opts.Size / PageSize)
	fs.toPin = pageset.New(fs.opts.Size / PageSize)
	fs.pinKick = make(chan struct{}, 1)
	fs.pinEnd = make(chan struct{})
	var ctx context.Context
	ctx, fs.pinCancel = context.WithCancel(fs.ctx)
	go fs.pinner(ctx)
	return nil
}

// schedulePin hands pages written back for the first time to the pinner.
//
// Why pin: once written back a page is clean and evictable, and its newest
// content exists only in the page cache and on its way to the backup: the
// kernel must not drop it and read a stale version from the Source.
// Locking all guest RAM up front (QEMU mem-lock) would fault in every page
// and defeat lazy restore; pages never written may be evicted and read from
// the Source again, which still holds them.
//
// Why another goroutine: mlock faults the page in and so waits for its
// folio lock. A guest re-dirtying that page holds the folio lock while it
// waits for the page's writeback, i.e. for a FUSE WRITE to return. If that
// WRITE (or the queue it waits on) depended on the mlock, nothing would
// move again. The pinner depends on nothing that writeback needs.
func (fs *FS) schedulePin(first, count int64) {
	if fs.toPin == nil {
		return
	}
	fs.mu.Lock()
	added := false
	for p := first; p < first+count; p++ {
		if !fs.pinned.Has(p) {
			fs.pinned.AddRange(p, 1)
			fs.toPin.AddRange(p, 1)
			added = true
		}
	}
	fs.mu.Unlock()
	if added {
		select {
		case fs.pinKick <- struct{}{}:
		default:
		}
	}
}

// pinner locks scheduled pages until ctx ends.
func (fs *FS) pinner(ctx context.Context) {
	defer close(fs.pinEnd)
	for {
		select {
		case <-ctx.Done():
			return
		case <-fs.pinKick:
		}
		fs.mu.Lock()
		var runs [][2]int64
		fs.toPin.Runs(256, func(first, n int64) bool {
			runs = append(runs, [2]int64{first, n})
			return true
		})
		fs.toPin.Clear()
		fs.mu.Unlock()
		for _, r := range runs {
			if ctx.Err() != nil {
				return
			}
			err := unix.Mlock(fs.pin[r[0]*PageSize : (r[0]+r[1])*PageSize])
			fs.mu.Lock()
			if err != nil {
				fs.stats.PinFailures++
				if !fs.pinWarned {
					fs.pinWarned = true
					fs.log.Error("cannot lock written pages in memory (CAP_IPC_LOCK?); an evicted page will read as EIO", "err", err)
				}
			} else {
				fs.stats.PinnedBytes += r[1] * PageSize
			}
			fs.mu.Unlock()
		}
	}
}

// Read serves pages that are not in the page cache from the Source.
func (fs *FS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	if in.NodeId != fileIno {
		return nil, fuse.EBADF
	}
	off := int64(in.Offset)
	if off >= fs.opts.Size {
		return fuse.ReadResultData(nil), fuse.OK
	}
	n := min(int64(in.Size), fs.opts.Size-off)
	// Widen to whole pages for the Source; the kernel asks for pages anyway.
	first := off / PageSize * PageSize
	end := (off + n + PageSize - 1) / PageSize * PageSize
	fs.mu.Lock()
	for p := first / PageSize; p < end/PageSize; p++ {
		if fs.written.Has(p) {
			fs.mu.Unlock()
			fs.log.Error("read of a written-back page that left the page cache; is guest RAM locked?", "page", p)
			return nil, fuse.EIO
		}
	}
	fs.stats.Reads++
	fs.stats.BytesRead += end - first
	fs.served.AddRange(first/PageSize, (end-first)/PageSize)
	fs.mu.Unlock()
	var pb []byte
	if first == off && end-first <= int64(len(buf)) {
		pb = buf[:end-first]
	} else {
		pb = make([]byte, end-first)
	}
	ctx, stop := cancelContext(fs.ctx, cancel)
	defer stop()
	if err := fs.opts.Source.ReadPages(ctx, first, pb); err != nil {
		fs.log.Error("source failed", "off", first, "len", len(pb), "err", err)
		return nil, fuse.EIO
	}
	return fuse.ReadResultData(pb[off-first : off-first+n]), fuse.OK
}

// Fsync is the flush barrier. The kernel has already written back every
// dirty page (and our Write has queued each) before it sends FSYNC.
func (fs *FS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	ctx, stop := cancelContext(fs.ctx, cancel)
	defer stop()
	if err := fs.Barrier(ctx); err != nil {
		fs.log.Warn("fsync barrier failed", "err", err)
		if errors.Is(err, context.Canceled) {
			return fuse.EINTR
		}
		return fuse.EIO
	}
	return fuse.OK
}

// Fallocate is refused: the file is always fully present.
func (fs *FS) Fallocate(<-chan struct{}, *fuse.FallocateIn) fuse.Status {
	return fuse.Status(syscall.EOPNOTSUPP)
}

// Store pushes pages into the kernel's page cache ahead of the guest, so
// its first touch does not fault. It overwrites whatever the cache holds
// (FUSE notify-store does), so it is only safe before the guest runs: once
// it does, use Preload, which can never roll a page back.
func (fs *FS) Store(off int64, data []byte) error {
	if off%PageSize != 0 || off < 0 || off+int64(len(data)) > fs.opts.Size {
		return fmt.Errorf("memfs store %d bytes at %d: outside file or unaligned", len(data), off)
	}
	if st := fs.srv.InodeNotifyStoreCache(fileIno, off, data); st != fuse.OK {
		return fmt.Errorf("memfs store %d bytes at %d: %w", len(data), off, syscall.Errno(st))
	}
	return nil
}

func cancelContext(parent context.Context, cancel <-chan struct{}) (context.Context, func()) {
	ctx, c := context.WithCancel(parent)
	go func() {
		select {
		case <-cancel:
			c()
		case <-ctx.Done():
		}
	}()
	return ctx, c
}

// byteSem is a counting semaphore of bytes whose waiters can be cancelled
// by FUSE interrupts.
type byteSem struct {
	mu   sync.Mutex
	free int64
	wake chan struct{}
}

func newByteSem(n int64) *byteSem { return &byteSem{free: n} }

// acquire takes n bytes, waiting while they are not free; blocked reports
// whether it had to wait.
func (s *byteSem) acquire(n int64, cancel <-chan struct{}) (blocked bool, err error) {
	for {
		s.mu.Lock()
		if s.free >= n {
			s.free -= n
			s.mu.Unlock()
			return blocked, nil
		}
		if s.wake == nil {
			s.wake = make(chan struct{})
		}
		w := s.wake
		s.mu.Unlock()
		blocked = true
		select {
		case <-w:
		case <-cancel:
			return blocked, errors.New("interrupted")
		}
	}
}

func (s *byteSem) release(n int64) {
	s.mu.Lock()
	s.free += n
	if s.wake != nil {
		close(s.wake)
		s.wake = nil
	}
	s.mu.Unlock()
}
