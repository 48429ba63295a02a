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
// hostd starts `hostd memserve -config FILE` (Spawn) and speaks to it with
// Client over a unix socket (HTTP/JSON, root only). api.go is the contract.
package memserver
