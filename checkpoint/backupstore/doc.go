// Package backupstore is the backup server's durable store of VM memory
// checkpoints: the bottom of the `backup` role. The server (package backup)
// feeds it the page extents and device state a host streams; restores read
// the committed image back, lazily (ReadAt, random access) or in full
// (ReadAll, sequential).
//
// Per VM, in <root>/<vm id>/:
//
//	image          sparse memory image, file offset = guest-physical offset
//	sums           8 bytes per page: CRC-32C of the committed page, flags
//	               (written, zero) and the epoch that last wrote the page
//	redo-<e>       the page extents of epoch e, appended as they arrive
//	state-<e>      the device-state blob of epoch e
//	manifest-<e>   the commit record of epoch e (binary, checksummed)
//
// Why a redo log. The image must always hold the last committed epoch, yet
// pages of the next epoch arrive long before it commits, and a crash can
// come at any time. Writing them into the image in place would destroy the
// committed epoch; an undo log would need a read of every old page before
// each write. So new pages are appended to redo-<e> (one large sequential
// write stream, no metadata churn beyond the file's growth). Commit is:
// fsync the log and state, write manifest-<e>.tmp, fsync, rename, fsync the
// directory - the rename is the commit point. Then the log is applied to
// the image and sums (idempotent: it only writes final values), both are
// fsynced and the log is unlinked. After a crash, Open discards every
// uncommitted log, state and temporary manifest and re-applies the log of
// the last committed epoch if it still exists. The cost is that each page
// is written twice (log, then image); the log write is sequential and the
// apply is sorted by nothing but arrival, which the disk absorbs well
// because most of it is still in the page cache.
//
// Disk full. The image is sparse; an in-place write into a hole needs a new
// block, and running out of space during apply - after the commit point -
// would leave a committed epoch that cannot be applied. So WriteExtent
// fallocates the extent's range of the image first (allocation without
// changing content): ENOSPC surfaces there, before the commit point, and
// the previous epoch stays intact.
//
// Restores. RestoreMap lists the committed image's non-zero pages with the
// epoch that last wrote each (so zero pages never leave the backup, and a
// prefetcher can bring the most recently dirtied first); ReadRestore reads
// pages with their stored sums and leaves the verdict to the restoring
// host, which checks each page end to end. Faults read through a handle
// advised FADV_RANDOM, sweeps through one advised FADV_SEQUENTIAL plus
// WILLNEED on the range. Neither ever writes.
package backupstore
