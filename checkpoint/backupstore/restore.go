package backupstore

import (
	"context"
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// zeroPageCRC is the CRC-32C of a page of zeros: what a page never written
// must match.
var zeroPageCRC = crc(make([]byte, PageSize))

// PageInfo is what the store holds about one page of the committed image.
type PageInfo struct {
	// CRC is the CRC-32C the page must have: the one computed when the
	// host's extent arrived (a zero page's for pages never written).
	CRC uint32
	// Epoch is the last committed epoch that wrote the page (saturated at
	// MaxTagEpoch); 0: never written, or written before the store
	// recorded epochs.
	Epoch uint64
	// Zero: never written, or written as zeros.
	Zero bool
}

func (v *VM) pageInfo(p int64) PageInfo {
	e := v.sums[p*sumEntry : p*sumEntry+sumEntry]
	flags := binary.BigEndian.Uint32(e[4:])
	if flags&flagWritten == 0 {
		return PageInfo{CRC: zeroPageCRC, Zero: true}
	}
	return PageInfo{CRC: binary.BigEndian.Uint32(e), Epoch: uint64(flags >> tagShift), Zero: flags&flagZero != 0}
}

// Run is a range of pages [First, First+Count) of the image, all not zero
// and last written in Epoch.
type Run struct {
	First, Count int64
	Epoch        uint64
}

// RestoreMap describes the committed image for a restore.
type RestoreMap struct {
	// Runs lists every page that is not zero, in ascending order:
	// everything else a restore can produce locally.
	Runs  []Run
	Pages int64 // pages in Runs
	// MaxEpoch is the newest epoch that wrote any page, zeros included;
	// Unknown counts written pages whose epoch was not recorded. Together
	// they tell whether the image still equals an older restore point.
	MaxEpoch uint64
	Unknown  int64
}

// RestoreMap returns the last committed manifest and the map of its image,
// read in one consistent snapshot (after any apply in progress).
func (v *VM) RestoreMap(ctx context.Context) (*Manifest, RestoreMap, error) {
	op := "map image of " + v.id
	var rm RestoreMap
	if err := v.waitApply(ctx); err != nil {
		return nil, rm, fmt.Errorf("%s: %w", op, err)
	}
	v.imageMu.RLock()
	defer v.imageMu.RUnlock()
	m := v.Committed()
	if m == nil {
		return nil, rm, fmt.Errorf("%s: nothing committed: %w", op, ErrNotFound)
	}
	for p := int64(0); p < v.size/PageSize; p++ {
		flags := binary.BigEndian.Uint32(v.sums[p*sumEntry+4:])
		if flags&flagWritten == 0 {
			continue
		}
		ep := uint64(flags >> tagShift)
		rm.MaxEpoch = max(rm.MaxEpoch, ep)
		if ep == 0 {
			rm.Unknown++
		}
		if flags&flagZero != 0 {
			continue
		}
		rm.Pages++
		if n := len(rm.Runs); n > 0 && rm.Runs[n-1].First+rm.Runs[n-1].Count == p && rm.Runs[n-1].Epoch == ep && rm.Runs[n-1].Count < 1<<31 {
			rm.Runs[n-1].Count++
			continue
		}
		rm.Runs = append(rm.Runs, Run{First: p, Count: 1, Epoch: ep})
	}
	return m, rm, nil
}

// ReadRestore reads committed image pages into p for a restore and fills
// info[i] with what the store holds about page i (len(info) must be
// len(p)/PageSize). Unlike ReadAt it does not judge: a page that fails its
// checksum is returned as read, with the sum it should match, so that the
// restoring host verifies end to end and reports exactly which page of the
// backup is damaged. sequential reads through the handle advised
// SEQUENTIAL, after asking the kernel to read the whole range ahead
// (WILLNEED): sweeps get large disk reads, faults keep the random handle's
// no-read-ahead. It never changes the store.
func (v *VM) ReadRestore(ctx context.Context, p []byte, off int64, info []PageInfo, sequential bool) error {
	op := fmt.Sprintf("read %d bytes at %d of %s for restore", len(p), off, v.id)
	if off < 0 || off%PageSize != 0 || len(p)%PageSize != 0 || off+int64(len(p)) > v.size || len(info) != len(p)/PageSize {
		return fmt.Errorf("%s: image is %d bytes: %w", op, v.size, ErrRange)
	}
	if err := v.waitApply(ctx); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	v.mu.Lock()
	closed := v.closed
	v.mu.Unlock()
	if closed {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	f := v.image
	if sequential {
		f = v.seq
		unix.Fadvise(int(f.Fd()), off, int64(len(p)), unix.FADV_WILLNEED)
	}
	v.imageMu.RLock()
	defer v.imageMu.RUnlock()
	if _, err := f.ReadAt(p, off); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	for i := range info {
		info[i] = v.pageInfo(off/PageSize + int64(i))
	}
	return nil
}
