package backupstore

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/wire"
)

// Errors callers test with errors.Is.
var (
	// ErrNotFound: no such VM in the store.
	ErrNotFound = errors.New("vm not in backup store")
	// ErrEpoch: an epoch out of sequence (not last committed + 1).
	ErrEpoch = errors.New("epoch out of sequence")
	// ErrRange: an extent or read outside the image or not page aligned.
	ErrRange = errors.New("outside image or unaligned")
	// ErrBusy: the VM already has an open epoch.
	ErrBusy = errors.New("vm has an open epoch")
	// ErrClosed: the VM or epoch is closed.
	ErrClosed = errors.New("closed")
)

const sumEntry = 8 // bytes per page in sums: u32 crc, u32 flags

// Flags of a sums entry. The epoch that last wrote a page lives in the
// upper 30 bits (a restore serves the most recently dirtied pages first and
// refuses an image that moved past its restore point); entries written
// before epochs were recorded carry 0 there (unknown) and no zero flag.
const (
	flagWritten = 1
	flagZero    = 2 // written, and all zeros: a restore need not fetch it
	tagShift    = 2
	// MaxTagEpoch is the largest epoch a page's tag records; later epochs
	// saturate there (about 34 years of one epoch a second).
	MaxTagEpoch = 1<<30 - 1
)

// redoBuffer is the write buffer of a redo log: extents are coalesced into
// large sequential writes.
const redoBuffer = 4 << 20

// Store is a directory of per-VM backups. It is safe for concurrent use;
// each VM is opened once and shared.
type Store struct {
	root string
	log  *slog.Logger
	hook func(stage string, epoch uint64) // crash-test hook; nil outside tests

	mu  sync.Mutex
	vms map[string]*VM
}

// Options tune a Store.
type Options struct {
	Logger *slog.Logger
}

// Open opens (creating) a store rooted at dir.
func Open(dir string, opts Options) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open backup store %s: %w", dir, err)
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	return &Store{root: dir, log: l.With("component", "backupstore"), vms: map[string]*VM{}}, nil
}

// Close closes every open VM.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for id, v := range s.vms {
		errs = append(errs, v.close())
		delete(s.vms, id)
	}
	return errors.Join(errs...)
}

// VM opens the backup of a VM, creating it with imageSize bytes if it does
// not exist (create=true) and recovering it from any crash. An existing VM
// must have the same image size.
func (s *Store) VM(id string, imageSize int64, create bool) (*VM, error) {
	if err := wire.ValidVMID(id); err != nil {
		return nil, fmt.Errorf("open vm backup: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if v, ok := s.vms[id]; ok && v.isClosed() {
		// A failed apply closed it: reopening runs recovery, which
		// finishes the committed epoch.
		v.close()
		delete(s.vms, id)
	}
	if v, ok := s.vms[id]; ok {
		if imageSize != 0 && v.size != imageSize {
			return nil, fmt.Errorf("open vm backup %s: image is %d bytes, asked %d: %w", id, v.size, imageSize, ErrRange)
		}
		return v, nil
	}
	v, err := openVM(s, id, imageSize, create)
	if err != nil {
		return nil, err
	}
	s.vms[id] = v
	return v, nil
}

// VM is one VM's backup.
type VM struct {
	s    *Store
	id   string
	dir  string
	size int64

	// imageMu orders image readers against apply, which rewrites pages.
	imageMu sync.RWMutex
	image   *os.File // random-access handle, FADV_RANDOM
	seq     *os.File // read-only handle for sweeps, FADV_SEQUENTIAL
	sumsF   *os.File
	sums    []byte // in-memory copy of sums

	mu        sync.Mutex
	committed *Manifest // nil: nothing committed yet
	open      *Epoch
	closed    bool
	// applying is closed when the last committed epoch's apply has ended
	// (nil: none ran); applyErr is its failure.
	applying chan struct{}
	applyErr error
}

// waitApply waits for the apply of the last committed epoch. Everything
// that reads the image, and the next commit point, must come after it.
func (v *VM) waitApply(ctx context.Context) error {
	v.mu.Lock()
	ch := v.applying
	v.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
	case <-ctx.Done():
		return ctx.Err()
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.applyErr != nil {
		return fmt.Errorf("apply of epoch %d failed (reopen the store to finish it): %w", v.committed.Epoch, v.applyErr)
	}
	return nil
}

func openVM(s *Store, id string, size int64, create bool) (*VM, error) {
	dir := filepath.Join(s.root, id)
	v := &VM{s: s, id: id, dir: dir}
	op := "open vm backup " + id
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if !create {
			return nil, fmt.Errorf("%s: %w", op, ErrNotFound)
		}
		if size <= 0 || size%PageSize != 0 {
			return nil, fmt.Errorf("%s: image size %d not a positive multiple of %d: %w", op, size, PageSize, ErrRange)
		}
		if err := v.create(size); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	if err := v.recover(size); err != nil {
		v.close()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return v, nil
}

// create lays out a new VM directory atomically: built under a temporary
// name and renamed into place, so a half-created VM is never seen.
func (v *VM) create(size int64) error {
	tmp := v.dir + ".creating"
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(tmp, "image"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		return fmt.Errorf("create image: %w", err)
	}
	f, err = os.OpenFile(filepath.Join(tmp, "sums"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	// The checksum table is small (0.2 % of the image); reserve it whole
	// so that apply never hits ENOSPC on it.
	err = unix.Fallocate(int(f.Fd()), 0, 0, size/PageSize*sumEntry)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		return fmt.Errorf("create checksum table: %w", err)
	}
	if err := syncDir(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, v.dir); err != nil {
		return err
	}
	return syncDir(filepath.Dir(v.dir))
}

// recover opens the files, finds the last committed epoch, discards
// everything uncommitted and finishes a committed epoch's apply.
func (v *VM) recover(wantSize int64) error {
	ents, err := os.ReadDir(v.dir)
	if err != nil {
		return err
	}
	var last uint64
	for _, e := range ents {
		if n, ok := epochOf(e.Name(), "manifest-"); ok && n > last {
			last = n
		}
	}
	if last > 0 {
		b, err := os.ReadFile(v.path("manifest", last))
		if err != nil {
			return err
		}
		if v.committed, err = decodeManifest(b); err != nil {
			return fmt.Errorf("manifest-%d: %w", last, err)
		}
		if v.committed.Epoch != last {
			return fmt.Errorf("manifest-%d records epoch %d: %w", last, v.committed.Epoch, ErrCorrupt)
		}
	}
	if v.image, err = os.OpenFile(filepath.Join(v.dir, "image"), os.O_RDWR, 0); err != nil {
		return err
	}
	st, err := v.image.Stat()
	if err != nil {
		return err
	}
	v.size = st.Size()
	if wantSize != 0 && wantSize != v.size {
		return fmt.Errorf("image is %d bytes, asked %d: %w", v.size, wantSize, ErrRange)
	}
	if v.committed != nil && v.committed.ImageSize != v.size {
		return fmt.Errorf("image is %d bytes, manifest says %d: %w", v.size, v.committed.ImageSize, ErrCorrupt)
	}
	// Lazy restores fault pages in guest order, which is no order at all
	// for the disk: readahead would only waste bandwidth.
	if err := unix.Fadvise(int(v.image.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
		return fmt.Errorf("fadvise image: %w", err)
	}
	// Sweeps (full restores, prefetchers) read long ranges in order: a
	// handle of their own keeps the random handle's hint for faults.
	if v.seq, err = os.Open(filepath.Join(v.dir, "image")); err != nil {
		return err
	}
	if err := unix.Fadvise(int(v.seq.Fd()), 0, 0, unix.FADV_SEQUENTIAL); err != nil {
		return fmt.Errorf("fadvise image: %w", err)
	}
	if v.sumsF, err = os.OpenFile(filepath.Join(v.dir, "sums"), os.O_RDWR, 0); err != nil {
		return err
	}
	v.sums = make([]byte, v.size/PageSize*sumEntry)
	if _, err := io.ReadFull(v.sumsF, v.sums); err != nil {
		return fmt.Errorf("read checksum table: %w", err)
	}
	// Discard what was never committed; keep the state blob the last
	// manifest refers to.
	var keepState uint64
	if v.committed != nil {
		keepState = v.committed.StateEpoch
	}
	for _, e := range ents {
		name := e.Name()
		stale := strings.HasSuffix(name, ".tmp")
		if n, ok := epochOf(name, "manifest-"); ok && n != last {
			stale = true
		}
		if n, ok := epochOf(name, "redo-"); ok && n != last {
			stale = true
		}
		if n, ok := epochOf(name, "state-"); ok && n != keepState {
			stale = true
		}
		if stale {
			v.s.log.Info("discarding uncommitted data", "vm", v.id, "file", name)
			if err := os.Remove(filepath.Join(v.dir, name)); err != nil {
				return err
			}
		}
	}
	if last > 0 {
		if _, err := os.Stat(v.path("redo", last)); err == nil {
			v.s.log.Info("re-applying committed epoch after restart", "vm", v.id, "epoch", last)
			if err := v.apply(v.committed); err != nil {
				return err
			}
		}
	}
	return syncDir(v.dir)
}

func epochOf(name, prefix string) (uint64, bool) {
	if !strings.HasPrefix(name, prefix) {
		return 0, false
	}
	n, err := strconv.ParseUint(name[len(prefix):], 10, 64)
	return n, err == nil && n > 0
}

func (v *VM) path(kind string, epoch uint64) string {
	return filepath.Join(v.dir, kind+"-"+strconv.FormatUint(epoch, 10))
}

func (v *VM) isClosed() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.closed
}

// ID is the VM's id.
func (v *VM) ID() string { return v.id }

// Size is the image size in bytes.
func (v *VM) Size() int64 { return v.size }

// Committed returns the last committed epoch's manifest, or nil.
func (v *VM) Committed() *Manifest {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.committed
}

// CommittedEpoch is the last committed epoch number (0: none).
func (v *VM) CommittedEpoch() uint64 {
	if m := v.Committed(); m != nil {
		return m.Epoch
	}
	return 0
}

// Epoch is an open, uncommitted epoch. Its methods are not safe for
// concurrent use: one stream feeds one epoch.
type Epoch struct {
	v       *VM
	n       uint64
	redo    *os.File
	w       *bufio.Writer
	redoLen int64
	redoCRC uint32
	hdr     []byte
	extents []ExtentSum
	bytes   int64
	digest  uint32
	state   *os.File
	stLen   int64
	stCRC   uint32
	done    bool
}

// Begin opens epoch n, which must be the last committed epoch + 1. An
// epoch left open by a dead stream is aborted first (abandon=true), so a
// reconnecting host can start over.
func (v *VM) Begin(n uint64, abandon bool) (*Epoch, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	op := fmt.Sprintf("begin epoch %d of %s", n, v.id)
	if v.closed {
		return nil, fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if v.open != nil {
		if !abandon {
			return nil, fmt.Errorf("%s: epoch %d open: %w", op, v.open.n, ErrBusy)
		}
		v.open.abortLocked()
	}
	var last uint64
	if v.committed != nil {
		last = v.committed.Epoch
	}
	if n != last+1 {
		return nil, fmt.Errorf("%s: last committed is %d: %w", op, last, ErrEpoch)
	}
	f, err := os.OpenFile(v.path("redo", n), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	e := &Epoch{v: v, n: n, redo: f, w: bufio.NewWriterSize(f, redoBuffer)}
	v.open = e
	return e, nil
}

// N is the epoch number.
func (e *Epoch) N() uint64 { return e.n }

// WriteExtent appends page data at a guest-physical offset to the epoch.
// The data is not visible to readers until Commit.
func (e *Epoch) WriteExtent(off int64, data []byte) error {
	op := fmt.Sprintf("write extent at %d (%d bytes) to epoch %d of %s", off, len(data), e.n, e.v.id)
	if e.done {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if off < 0 || off%PageSize != 0 || len(data) == 0 || len(data)%PageSize != 0 || off+int64(len(data)) > e.v.size {
		return fmt.Errorf("%s: image is %d bytes: %w", op, e.v.size, ErrRange)
	}
	// Reserve the image blocks now, so that ENOSPC surfaces before the
	// commit point (see doc.go). It does not change the image's content.
	if err := unix.Fallocate(int(e.v.image.Fd()), 0, off, int64(len(data))); err != nil {
		return fmt.Errorf("%s: reserve image blocks: %w", op, err)
	}
	sums := make([]uint32, len(data)/PageSize)
	for i := range sums {
		sums[i] = crc(data[i*PageSize : (i+1)*PageSize])
	}
	dcrc := crc(data)
	e.hdr = appendRedoHeader(e.hdr[:0], off, len(data), dcrc)
	if err := e.append(e.hdr); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := e.append(data); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	e.extents = append(e.extents, ExtentSum{Offset: off, PageCRCs: sums})
	e.bytes += int64(len(data))
	e.digest = wire.UpdateChecksum(e.digest, binary.BigEndian.AppendUint32(nil, dcrc))
	e.v.s.testHook("extent-written", e.n)
	return nil
}

func (e *Epoch) append(b []byte) error {
	if _, err := e.w.Write(b); err != nil {
		return fmt.Errorf("append to redo log: %w", err)
	}
	e.redoLen += int64(len(b))
	e.redoCRC = wire.UpdateChecksum(e.redoCRC, b)
	return nil
}

// WriteState appends device-state bytes at off within the epoch's blob;
// chunks must arrive in order.
func (e *Epoch) WriteState(off int64, data []byte) error {
	op := fmt.Sprintf("write device state at %d to epoch %d of %s", off, e.n, e.v.id)
	if e.done {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if off != e.stLen {
		return fmt.Errorf("%s: expected offset %d: %w", op, e.stLen, ErrRange)
	}
	if e.state == nil {
		f, err := os.OpenFile(e.v.path("state", e.n), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		e.state = f
	}
	if _, err := e.state.Write(data); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	e.stLen += int64(len(data))
	e.stCRC = wire.UpdateChecksum(e.stCRC, data)
	return nil
}

// Summary is what an epoch holds so far, for checking a client's commit.
type Summary struct {
	Extents  int
	Bytes    int64
	Digest   uint32 // CRC-32C over the big-endian CRC of each extent, in order
	StateLen int64
	StateCRC uint32
}

// Summary describes the data written so far.
func (e *Epoch) Summary() Summary {
	return Summary{Extents: len(e.extents), Bytes: e.bytes, Digest: e.digest, StateLen: e.stLen, StateCRC: e.stCRC}
}

// Commit makes the epoch durable and visible: after it returns nil, the
// epoch survives any crash, and readers see it. restorable marks a restore
// point (the VM was paused and its device state is in this epoch).
func (e *Epoch) Commit(ctx context.Context, restorable bool) (*Manifest, error) {
	v := e.v
	op := fmt.Sprintf("commit epoch %d of %s", e.n, v.id)
	if e.done {
		return nil, fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	// Any failure before the commit point aborts the epoch: the host
	// resends it, and the committed image was never touched.
	fail := func(err error) (*Manifest, error) {
		v.mu.Lock()
		e.abortLocked()
		v.mu.Unlock()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if restorable && e.state == nil {
		return fail(fmt.Errorf("restore point without device state: %w", ErrRange))
	}
	if err := e.w.Flush(); err != nil {
		return fail(fmt.Errorf("flush redo log: %w", err))
	}
	if err := e.redo.Sync(); err != nil {
		return fail(fmt.Errorf("fsync redo log: %w", err))
	}
	m := &Manifest{
		Epoch: e.n, ImageSize: v.size, Restorable: restorable,
		RedoLen: e.redoLen, RedoCRC: e.redoCRC, UnixNano: time.Now().UnixNano(), Extents: e.extents,
	}
	if e.state != nil {
		if err := e.state.Sync(); err != nil {
			return fail(fmt.Errorf("fsync device state: %w", err))
		}
		m.StateEpoch, m.StateLen, m.StateCRC = e.n, e.stLen, e.stCRC
	} else if prev := v.Committed(); prev != nil {
		m.StateEpoch, m.StateLen, m.StateCRC = prev.StateEpoch, prev.StateLen, prev.StateCRC
	}
	// Recovery re-applies only the last committed epoch's log, so the
	// previous epoch must be in the image before this one commits.
	if err := v.waitApply(ctx); err != nil {
		return fail(err)
	}
	final := v.path("manifest", e.n)
	if err := writeFileSync(final+".tmp", m.encode()); err != nil {
		return fail(err)
	}
	v.s.testHook("before-rename", e.n)
	if err := os.Rename(final+".tmp", final); err != nil {
		return fail(fmt.Errorf("rename manifest: %w", err))
	}
	// The directory fsync makes the rename, the redo log's and the state
	// blob's names durable at once: this is the commit point.
	if err := syncDir(v.dir); err != nil {
		return fail(err)
	}
	v.s.testHook("committed", e.n)
	v.mu.Lock()
	e.done = true
	e.redo.Close()
	if e.state != nil {
		e.state.Close()
	}
	v.open = nil
	prev := v.committed
	v.committed = m
	done := make(chan struct{})
	v.applying = done
	v.mu.Unlock()

	// The epoch is durable: acknowledge now and apply behind the ack. The
	// host's next epoch streams into a new log meanwhile; readers and the
	// next commit wait for the apply (waitApply).
	go func() {
		defer close(done)
		err := v.apply(m)
		v.mu.Lock()
		defer v.mu.Unlock()
		if err != nil {
			// The next Open re-applies the epoch; until then this VM must
			// not serve a half-applied image.
			v.s.log.Error("apply failed; reopen the store to finish it", "vm", v.id, "epoch", m.Epoch, "err", err)
			v.applyErr = err
			v.closed = true
			return
		}
		v.cleanup(prev, m)
	}()
	return m, nil
}

// apply copies the redo log of m into the image and the checksum table,
// fsyncs both and removes the log.
func (v *VM) apply(m *Manifest) error {
	v.imageMu.Lock()
	defer v.imageMu.Unlock()
	f, err := os.Open(v.path("redo", m.Epoch))
	if err != nil {
		return fmt.Errorf("apply epoch %d: %w", m.Epoch, err)
	}
	defer f.Close()
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	r := bufio.NewReaderSize(f, redoBuffer)
	var logCRC uint32
	var n int64
	hdr := make([]byte, redoHeader)
	buf := make([]byte, 0, 1<<20)
	dirty := map[int64]bool{} // sums pages touched, to write back only those
	for i, ext := range m.Extents {
		if _, err := io.ReadFull(r, hdr); err != nil {
			return fmt.Errorf("apply epoch %d: redo record %d: %w (%w)", m.Epoch, i, err, ErrCorrupt)
		}
		off, ln, dcrc, err := parseRedoHeader(hdr)
		if err != nil {
			return fmt.Errorf("apply epoch %d: record %d: %w", m.Epoch, i, err)
		}
		if off != ext.Offset || ln != len(ext.PageCRCs)*PageSize {
			return fmt.Errorf("apply epoch %d: record %d is %d@%d, manifest says %d@%d: %w", m.Epoch, i, ln, off, len(ext.PageCRCs)*PageSize, ext.Offset, ErrCorrupt)
		}
		if cap(buf) < ln {
			buf = make([]byte, ln)
		}
		data := buf[:ln]
		if _, err := io.ReadFull(r, data); err != nil {
			return fmt.Errorf("apply epoch %d: record %d data: %w (%w)", m.Epoch, i, err, ErrCorrupt)
		}
		if crc(data) != dcrc {
			return fmt.Errorf("apply epoch %d: record %d data checksum: %w", m.Epoch, i, ErrCorrupt)
		}
		logCRC = wire.UpdateChecksum(wire.UpdateChecksum(logCRC, hdr), data)
		n += int64(redoHeader + ln)
		if _, err := v.image.WriteAt(data, off); err != nil {
			return fmt.Errorf("apply epoch %d: write image at %d: %w", m.Epoch, off, err)
		}
		tag := uint32(min(m.Epoch, MaxTagEpoch)) << tagShift
		for j, c := range ext.PageCRCs {
			p := off/PageSize + int64(j)
			flags := flagWritten | tag
			if c == zeroPageCRC && isZero(data[j*PageSize:(j+1)*PageSize]) {
				flags |= flagZero
			}
			binary.BigEndian.PutUint32(v.sums[p*sumEntry:], c)
			binary.BigEndian.PutUint32(v.sums[p*sumEntry+4:], flags)
			dirty[p*sumEntry/4096] = true
		}
		if i == len(m.Extents)/2 {
			v.s.testHook("mid-apply", m.Epoch)
		}
	}
	if n != m.RedoLen || logCRC != m.RedoCRC {
		return fmt.Errorf("apply epoch %d: redo log %d bytes crc %08x, manifest says %d bytes crc %08x: %w", m.Epoch, n, logCRC, m.RedoLen, m.RedoCRC, ErrCorrupt)
	}
	blocks := make([]int64, 0, len(dirty))
	for b := range dirty {
		blocks = append(blocks, b)
	}
	sort.Slice(blocks, func(i, j int) bool { return blocks[i] < blocks[j] })
	for _, b := range blocks {
		end := min((b+1)*4096, int64(len(v.sums)))
		if _, err := v.sumsF.WriteAt(v.sums[b*4096:end], b*4096); err != nil {
			return fmt.Errorf("apply epoch %d: write checksum table: %w", m.Epoch, err)
		}
	}
	if err := v.image.Sync(); err != nil {
		return fmt.Errorf("apply epoch %d: fsync image: %w", m.Epoch, err)
	}
	if err := v.sumsF.Sync(); err != nil {
		return fmt.Errorf("apply epoch %d: fsync checksum table: %w", m.Epoch, err)
	}
	v.s.testHook("applied", m.Epoch)
	if err := os.Remove(v.path("redo", m.Epoch)); err != nil {
		return fmt.Errorf("apply epoch %d: remove redo log: %w", m.Epoch, err)
	}
	return nil
}

// cleanup removes what the new commit superseded: the previous manifest
// (the new one is complete on its own) and an unreferenced state blob.
// Failures only leave garbage that the next Open removes.
func (v *VM) cleanup(prev, m *Manifest) {
	if prev == nil {
		return
	}
	os.Remove(v.path("manifest", prev.Epoch))
	if prev.StateEpoch != 0 && prev.StateEpoch != m.StateEpoch {
		os.Remove(v.path("state", prev.StateEpoch))
	}
}

// Abort discards the epoch; the committed image is untouched.
func (e *Epoch) Abort() {
	e.v.mu.Lock()
	defer e.v.mu.Unlock()
	e.abortLocked()
}

func (e *Epoch) abortLocked() {
	if e.done {
		return
	}
	e.done = true
	e.redo.Close()
	os.Remove(e.redo.Name())
	if e.state != nil {
		e.state.Close()
		os.Remove(e.state.Name())
	}
	if e.v.open == e {
		e.v.open = nil
	}
}

// ReadAt reads committed image pages into p, verifying each page against
// its checksum. off and len(p) must be page aligned. It is meant for lazy
// restore: the handle is advised FADV_RANDOM.
func (v *VM) ReadAt(p []byte, off int64) (int, error) {
	op := fmt.Sprintf("read %d bytes at %d of %s", len(p), off, v.id)
	if off < 0 || off%PageSize != 0 || len(p)%PageSize != 0 || off+int64(len(p)) > v.size {
		return 0, fmt.Errorf("%s: image is %d bytes: %w", op, v.size, ErrRange)
	}
	if err := v.waitApply(context.Background()); err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	v.mu.Lock()
	closed := v.closed
	v.mu.Unlock()
	if closed {
		return 0, fmt.Errorf("%s: %w", op, ErrClosed)
	}
	v.imageMu.RLock()
	defer v.imageMu.RUnlock()
	n, err := v.image.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("%s: %w", op, err)
	}
	if err := v.verify(p, off); err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	return n, nil
}

// verify checks pages read from the image at off against the sums table.
// A page never written must read as zeros.
func (v *VM) verify(p []byte, off int64) error {
	for i := 0; i < len(p); i += PageSize {
		pg := (off + int64(i)) / PageSize
		e := v.sums[pg*sumEntry : pg*sumEntry+sumEntry]
		page := p[i : i+PageSize]
		if binary.BigEndian.Uint32(e[4:])&flagWritten == 0 {
			if !isZero(page) {
				return fmt.Errorf("page %d never written but not zero: %w", pg, ErrCorrupt)
			}
			continue
		}
		if c := crc(page); c != binary.BigEndian.Uint32(e) {
			return fmt.Errorf("page %d checksum %08x, expected %08x: %w", pg, c, binary.BigEndian.Uint32(e), ErrCorrupt)
		}
	}
	return nil
}

// ReadAll streams the whole committed image to w, verified, for a full
// (stop-and-copy) restore. It opens its own handle advised SEQUENTIAL and
// WILLNEED, so the kernel reads ahead in large chunks.
func (v *VM) ReadAll(ctx context.Context, w io.Writer) error {
	op := "read full image of " + v.id
	f, err := os.Open(filepath.Join(v.dir, "image"))
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer f.Close()
	if err := v.waitApply(ctx); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_WILLNEED)
	v.imageMu.RLock()
	defer v.imageMu.RUnlock()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < v.size; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		chunk := buf[:min(int64(len(buf)), v.size-off)]
		if _, err := f.ReadAt(chunk, off); err != nil {
			return fmt.Errorf("%s: at %d: %w", op, off, err)
		}
		if err := v.verify(chunk, off); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		if _, err := w.Write(chunk); err != nil {
			return fmt.Errorf("%s: write out at %d: %w", op, off, err)
		}
	}
	return nil
}

// DeviceState returns the device-state blob of the last committed restore
// point, verified against the manifest.
func (v *VM) DeviceState() ([]byte, *Manifest, error) {
	m := v.Committed()
	op := "read device state of " + v.id
	if m == nil || m.StateEpoch == 0 {
		return nil, m, fmt.Errorf("%s: no committed device state: %w", op, ErrNotFound)
	}
	b, err := os.ReadFile(v.path("state", m.StateEpoch))
	if err != nil {
		return nil, m, fmt.Errorf("%s: %w", op, err)
	}
	if int64(len(b)) != m.StateLen || crc(b) != m.StateCRC {
		return nil, m, fmt.Errorf("%s: blob of %d bytes does not match manifest: %w", op, len(b), ErrCorrupt)
	}
	return b, m, nil
}

// Sync waits until the last commit is applied to the image.
func (v *VM) Sync(ctx context.Context) error { return v.waitApply(ctx) }

func (v *VM) close() error {
	v.waitApply(context.Background())
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.open != nil {
		v.open.abortLocked()
	}
	v.closed = true
	var errs []error
	if v.image != nil {
		errs = append(errs, v.image.Close())
	}
	if v.seq != nil {
		errs = append(errs, v.seq.Close())
	}
	if v.sumsF != nil {
		errs = append(errs, v.sumsF.Close())
	}
	return errors.Join(errs...)
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	return bytes.Count(b, []byte{0}) == len(b)
}

func (s *Store) testHook(stage string, epoch uint64) {
	if s.hook != nil {
		s.hook(stage, epoch)
	}
}

func writeFileSync(name string, b []byte) error {
	f, err := os.OpenFile(name, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(name), err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(name)
		return fmt.Errorf("write %s: %w", filepath.Base(name), err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(name)
		return fmt.Errorf("fsync %s: %w", filepath.Base(name), err)
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
