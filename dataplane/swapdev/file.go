package swapdev

import (
	"context"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FileBackend is a swap disk on a local file, nothing more: the baseline
// of the benchmarks (a swap file on local disk), and a fallback for hosts
// without repositories.
type FileBackend struct {
	f      *os.File
	size   int64
	direct bool
}

// OpenFile creates path with size bytes. direct opens it O_DIRECT, so
// that reads and writes reach the disk instead of the page cache, as they
// do for swap on a host short of memory (misaligned buffers are bounced
// through aligned ones).
func OpenFile(path string, size int64, direct bool) (*FileBackend, error) {
	flags := os.O_RDWR | os.O_CREATE | os.O_TRUNC
	if direct {
		flags |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open swap file: %w", err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		f.Close()
		return nil, fmt.Errorf("open swap file: reserve %d bytes: %w", size, err)
	}
	return &FileBackend{f: f, size: size, direct: direct}, nil
}

func (b *FileBackend) Size() int64 { return b.size }

// aligned returns p, or an aligned copy-buffer for O_DIRECT.
func (b *FileBackend) aligned(p []byte) ([]byte, bool) {
	if !b.direct || len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))%4096 == 0 {
		return p, false
	}
	raw := make([]byte, len(p)+4096)
	k := int(4096 - uintptr(unsafe.Pointer(&raw[0]))%4096)
	return raw[k : k+len(p)], true
}

func (b *FileBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	buf, bounced := b.aligned(p)
	if _, err := b.f.ReadAt(buf, off); err != nil {
		return err
	}
	if bounced {
		copy(p, buf)
	}
	return nil
}

func (b *FileBackend) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	buf, bounced := b.aligned(p)
	if bounced {
		copy(buf, p)
	}
	if _, err := b.f.WriteAt(buf, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

func (b *FileBackend) Trim(_ context.Context, off, length int64) error {
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (b *FileBackend) Flush(context.Context) error { return unix.Fdatasync(int(b.f.Fd())) }

func (b *FileBackend) Close() error { return b.f.Close() }
