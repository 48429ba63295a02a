// Package checkpoint is the guest memory plane of hostd: continuous,
// bounded-time checkpointing of nested VMs' memory to a backup server.
//
// The pieces, bottom up:
//
//   - memfs: a per-VM FUSE filesystem serving the guest's RAM file. The
//     kernel's writeback of that file is the dirty-page stream; the
//     mount's backing-device dirty limit bounds unflushed memory and
//     throttles a guest that dirties faster than the backup link.
//   - wire: the framed protocol between a host and a backup server.
//   - backupstore: the backup's durable store (sparse image, redo log per
//     epoch, manifests) that keeps the last committed epoch intact.
//   - backup / backupclient: the backup role's mutual-TLS server and the
//     host's client stream (send, commit, reconnect and resync, fetch for
//     lazy restore).
//   - pki: a test CA and certificates for the mutual TLS.
//   - flush: the arithmetic that turns a time bound and a measured
//     bandwidth into a dirty cap.
//   - bdi, pageset: small vocabularies (backing-device limits and stats; a
//     page bitmap).
//   - memfs/memfstest, bench: the stand-in guest process of tests and the
//     benchmarks.
//
// README.md records the choices and the measured figures.
//
// This package itself holds no code.
package checkpoint
