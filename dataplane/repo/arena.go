package repo

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// arena is the memory a repository lends: one anonymous mapping cut into
// PageSize slots. It lives outside the Go heap so that the collector never
// scans or moves it, and so that it can be locked.
type arena struct {
	mem    []byte
	free   []uint32 // stack of free slot numbers
	locked bool
}

// newArena maps size bytes (a multiple of PageSize) and tries to mlock
// them: swapped-out repository memory would turn a network read into a
// disk read on another host, the worst of both. lockErr says why locking
// failed (RLIMIT_MEMLOCK without CAP_IPC_LOCK, usually); the arena works
// either way.
func newArena(size int64, lock bool) (a *arena, lockErr error, err error) {
	mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, nil, fmt.Errorf("map %d bytes of repository memory: %w", size, err)
	}
	// Lent pages belong to other hosts' guests: keep them out of core
	// dumps and out of children.
	unix.Madvise(mem, unix.MADV_DONTDUMP)
	unix.Madvise(mem, unix.MADV_DONTFORK)
	a = &arena{mem: mem}
	if lock {
		if lerr := unix.Mlock(mem); lerr != nil {
			lockErr = fmt.Errorf("mlock %d bytes: %w (raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity in the unit, or grant CAP_IPC_LOCK)", size, lerr)
		} else {
			a.locked = true
		}
	}
	n := uint32(size / PageSize)
	a.free = make([]uint32, n)
	for i := range a.free {
		a.free[i] = n - 1 - uint32(i) // slot 0 on top: low addresses first
	}
	return a, lockErr, nil
}

func (a *arena) slot(i uint32) []byte {
	off := int(i) * PageSize
	return a.mem[off : off+PageSize : off+PageSize]
}

// alloc pops n slots, or returns nil if fewer are free.
func (a *arena) alloc(n int) []uint32 {
	if n > len(a.free) {
		return nil
	}
	s := make([]uint32, n)
	copy(s, a.free[len(a.free)-n:])
	a.free = a.free[:len(a.free)-n]
	return s
}

func (a *arena) release(slots []uint32) { a.free = append(a.free, slots...) }

func (a *arena) close() error {
	if a.mem == nil {
		return nil
	}
	err := unix.Munmap(a.mem)
	a.mem = nil
	return err
}
