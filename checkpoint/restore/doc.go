// Package restore brings a VM's memory back from a backup server: lazily
// (the guest runs at once; pages are fetched on first touch and by a
// background prefetcher) or in full (every page copied before the guest
// starts, the stop-and-copy baseline). It is the host's half of issue 4;
// the memory server (package memserver) mounts a memfs with a Restorer's
// Source and runs its prefetcher.
//
// Where pages come from. Open reads the restore point's page map: which
// pages are not zero, and the epoch that last wrote each. Zero pages are
// produced locally and never cross the wire. Every page fetched goes into
// a local sparse cache file, and is marked present there, before memfs
// hands it to the kernel: from then on a clean page the kernel evicts is
// read again from the cache file, not the backup. Once every non-zero page
// is in the cache file (fsynced), the VM no longer depends on the backup
// (written pages are pinned in the page cache by memfs).
//
// Faults fetch just the pages the kernel's READ asks for, over a
// connection of their own, so a fault waits for one round trip and its own
// bytes (optionally the aligned chunk around it follows in the background:
// Config.FaultChunk). A fault never waits for a prefetch chunk that covers
// its page (4 MiB, perhaps queued behind others): it fetches the page
// itself, and whichever copy lands first is the one the cache file keeps;
// it waits only for another fault already fetching the page. The mount's
// read-ahead sets how much a fault reads
// (memfs.Options.ReadAhead: one page is best for a lazy restore). The
// prefetcher and Full sweep in large chunks over another connection (the
// backup gives both fair turns on its disk), most recently dirtied pages
// first, at a configurable rate, and have the kernel read each brought
// chunk into the page cache with memfs.Preload, which never replaces a
// page the guest already has.
//
// Safety. Each page is checked against the CRC the backup stored when the
// host sent it: a mismatch is a damaged copy at the backup (the frame's own
// CRC having verified the transfer), reported as restore.corrupt_page and
// answered with EIO, never served. A page last written in an epoch after
// the restore point means another writer moved the backup on; it is
// refused the same way (restore.page_moved). If the backup is unreachable,
// or answers without the VM (restore.backup_refused: a store not mounted
// yet, or lost), reads retry with exponential backoff for as long as their
// context lives and the guest simply waits; each outage and recovery is an
// event.
package restore
