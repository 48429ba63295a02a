// Package memserver is the per-VM memory server: the process that serves a
// protected VM's RAM file over FUSE (package memfs), streams its dirty
// pages to a backup (package backupclient), keeps unflushed memory under
// the cap its bound allows (package flush), and, for a restore, fetches the
// pages the file does not hold yet from the backup.
//
// Why a process of its own per VM. A FUSE file lives as long as the process
// serving it: if hostd served guest RAM itself, a crash or upgrade of hostd
// would take every guest's memory with it. QEMU is libvirt's child, not
// hostd's, and the memory server is hostd's child only at birth (its own
// session, outside hostd's kill scope), so hostd can be killed, restarted
// or upgraded while guests keep running and keep being checkpointed; the
// next hostd finds each memory server on its control socket. The price is
// one process and one control socket per served VM.
//
// hostd starts `hostd memserve -config FILE` (Spawn, WriteConfig, Main) and
// speaks to it with Client over a unix socket (HTTP/JSON, root only;
// Attach after its own restart). api.go is the contract.
//
// Inside (Run): memfs's sink never changes, so it is a switch (sink.go):
// while unprotected it discards (memfs pins every written page, nothing is
// lost), while protected it forwards to the stream through the VM's rate
// share. Protect connects, then copies every page memfs ever wrote back
// (those writes were discarded), reading the RAM file with pread outside
// the sink's lock but under a watch, and sending only the pages no
// delivery touched meanwhile, so an older copy can never overtake a newer
// writeback (holding the lock across the read deadlocks: see sink.go), and
// commits once. A loop every 500 ms feeds the controller the bandwidth the
// sink measures while it is the bottleneck, commits every CommitInterval,
// reconnects a broken stream with backoff (the guest runs on meanwhile;
// Reconnect resends what the backup has not acknowledged) and probes an
// idle connection so a dead backup shows. Sync and Commit(state) make the
// restore point of an evacuation.
//
// The server never keeps a descriptor of its own RAM file open: a process
// killed with SIGKILL closes its descriptors after its FUSE server is gone,
// and the FUSE FLUSH of that close would hang its exit forever (seen).
package memserver
