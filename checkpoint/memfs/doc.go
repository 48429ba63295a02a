// Package memfs serves one VM's RAM file over FUSE: the file QEMU maps with
// memory-backend-file,share=on. It is where the memory plane meets the
// kernel (see design.md, "Guest memory plane"):
//
//   - The kernel's writeback of the file is the dirty-page stream. Each FUSE
//     WRITE is copied (a page redirtied while in flight must not be torn)
//     into a bounded queue and handed, in order, to a Sink (the backup
//     stream). When the queue is full the WRITE blocks, writeback stalls,
//     the mount's dirty pages reach its limit and the kernel throttles the
//     guest: that is the whole throttle, no guest cooperation needed.
//   - Each mount is its own backing device (/sys/class/bdi/0:N). Its
//     max_bytes with strict_limit bounds the file's dirty + under-writeback
//     page cache; SetDirtyCap sets it from the flush controller's cap.
//   - fsync of the file is the flush barrier: the kernel writes back every
//     dirty page, and the FSYNC handler returns once every queued write has
//     been delivered to the sink and the sink has flushed.
//   - A read of a page that is not in the page cache goes to a Source: zero
//     pages for a fresh VM, the backup for a lazy restore.
//
// Unflushed memory is therefore bounded by the bdi limit plus the queue:
// SetDirtyCap(D) sets the bdi to D minus the queue's capacity.
//
// The daemon never keeps page contents beyond the queue. A page that was
// written back is clean in the page cache, and its newest content exists
// only there and on its way to the backup: if the kernel evicted it and read
// it again, the Source would return a stale version. So the first time a
// page is written back memfs mlocks it (through a read-only mapping of the
// file in the daemon, used only as an address range for mlock(2); needs
// CAP_IPC_LOCK). Pages that were never written stay evictable and are read
// from the Source again, which still holds them; locking all guest RAM up
// front (QEMU mem-lock) would instead fault in every page and defeat lazy
// restore. If locking fails, a read of an evicted written page is refused
// with EIO (logged) rather than answered with stale data.
//
// Prefetch during a lazy restore uses Preload, not notify-store: the kernel
// reads in only pages it does not hold, so a page the guest has written can
// never be rolled back (preload.go says why a guarded notify-store cannot
// promise that).
//
// The guest must be another process: a Go process that faults on pages of
// a FUSE file it serves itself deadlocks (a thread stuck in a page fault
// cannot stop for the garbage collector, and the FUSE server goroutines
// never run again). System calls that fault pages in (mlock, munmap's
// writeback) are safe.
package memfs
