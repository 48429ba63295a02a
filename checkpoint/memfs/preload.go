package memfs

import (
	"context"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Why Preload and not a guarded notify-store.
//
// A prefetcher could push pages with FUSE notify-store, skipping pages
// memfs has served or taken a write of. That is not enough: the kernel
// locks a page and queues its READ before memfs sees the request, so a
// store decided in that window overwrites the page after the READ
// completes, and if the guest wrote it in between (its fault finished,
// its store went through the now-writable mapping) the write is rolled
// back. No lock in this process can close the window, and holding one
// across the notify deadlocks against that READ (the notify waits for the
// page lock the READ holds). The kernel, though, never reads a page it
// already caches: having it read the pages in (a read(2) of the file,
// answered by our Read from the Source) is race-free by construction.
// The price is one more copy and a FUSE round trip per 128 KiB, small
// next to fetching the page from a backup.

// PreloadResult counts what one Preload did.
type PreloadResult struct {
	Read    int64 // pages the kernel was asked to read in
	Skipped int64 // pages memfs had already served or taken a write of
}

// Preload has the kernel read the pages of [off, off+n) that memfs has
// never served nor taken a write of into the page cache, through the
// Source, so the guest's first touch of them does not fault. Pages the
// kernel already holds are not replaced: a page the guest wrote is never
// rolled back. off and n must be page aligned. It blocks while the Source
// answers; call it after the Source can serve the range locally (a lazy
// restore's prefetcher: after writing the pages to its cache file).
func (fs *FS) Preload(ctx context.Context, off, n int64) (PreloadResult, error) {
	var res PreloadResult
	op := fmt.Sprintf("memfs preload %d bytes at %d", n, off)
	if off < 0 || n < 0 || off%PageSize != 0 || n%PageSize != 0 || off+n > fs.opts.Size {
		return res, fmt.Errorf("%s: outside file or unaligned", op)
	}
	f, err := fs.preloadFile()
	if err != nil {
		return res, fmt.Errorf("%s: %w", op, err)
	}
	// Runs of untouched pages, decided under mu; a page the guest touches
	// after this is read by the kernel's own rules (it is cached, so our
	// read copies it out and changes nothing).
	var runs [][2]int64
	fs.mu.Lock()
	for p := off / PageSize; p < (off+n)/PageSize; p++ {
		if fs.served.Has(p) || fs.written.Has(p) {
			res.Skipped++
			continue
		}
		if k := len(runs); k > 0 && runs[k-1][0]+runs[k-1][1] == p && runs[k-1][1] < int64(fs.opts.MaxWrite/PageSize) {
			runs[k-1][1]++
			continue
		}
		runs = append(runs, [2]int64{p, 1})
	}
	fs.stats.PreloadSkipped += res.Skipped
	fs.mu.Unlock()
	buf := fs.get(fs.opts.MaxWrite)
	defer fs.put(buf)
	for _, r := range runs {
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("%s: %w", op, err)
		}
		// A system call, not a fault on a mapping: safe in the serving
		// process (see doc.go).
		b := buf[:r[1]*PageSize]
		if _, err := f.ReadAt(b, r[0]*PageSize); err != nil {
			return res, fmt.Errorf("%s: read in %d pages at page %d: %w", op, r[1], r[0], err)
		}
		res.Read += r[1]
		fs.mu.Lock()
		fs.stats.PreloadedBytes += r[1] * PageSize
		fs.mu.Unlock()
	}
	return res, nil
}

// preloadFile opens the read handle of Preload once. FADV_RANDOM turns the
// kernel's read-ahead off for it: a preload reads exactly its range, and
// never pages the Source would have to fetch remotely.
func (fs *FS) preloadFile() (*os.File, error) {
	fs.mu.Lock()
	f, closed := fs.preloadF, fs.closed
	fs.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("unmounted")
	}
	if f != nil {
		return f, nil
	}
	// Opened without mu: the open is a FUSE round trip to this process.
	f, err := os.Open(fs.Path())
	if err != nil {
		return nil, err
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
		f.Close()
		return nil, fmt.Errorf("fadvise: %w", err)
	}
	fs.mu.Lock()
	won, closed := fs.preloadF, fs.closed
	if !closed && won == nil {
		fs.preloadF = f
	}
	fs.mu.Unlock()
	if closed || won != nil {
		// Another preload opened one first. Closed without mu: the
		// close's FLUSH makes the kernel write back the file's dirty
		// pages, whose WRITEs memfs serves under mu (this deadlocked
		// once a guest ran on the file while the prefetch began).
		f.Close()
		if closed {
			return nil, fmt.Errorf("unmounted")
		}
		return won, nil
	}
	return f, nil
}

// Touched reports whether memfs has served page p to the kernel or taken a
// write of it: the page cache may then hold a newer version than any
// Source, and nothing may be pushed over it.
func (fs *FS) Touched(p int64) bool {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.served.Has(p) || fs.written.Has(p)
}

// HasWritten reports whether memfs has taken a write of page p: the guest's
// own content, pinned in the page cache, that no Source holds.
func (fs *FS) HasWritten(p int64) bool {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.written.Has(p)
}
