// Package backup is the `backup` role's network server: it accepts the
// page streams of many VMs from many hosts over mutual TLS 1.3, speaks the
// wire protocol, and stores into a backupstore. It acknowledges a commit
// only after the store has made the epoch durable (fsync), so a host may
// forget anything the backup has acknowledged.
//
// One session per VM at a time: a host that reconnects (after a network
// failure, or because the VM moved) takes the VM over from a stale session,
// whose open epoch is discarded.
//
// Restores are separate, read-only sessions (wire.RestoreHello): they never
// begin an epoch nor take a VM over from its writer, so a VM being
// protected (or a restored VM protected again) keeps streaming while any
// number of hosts restore from it. A fresh restore is refused with a clear
// error if the image moved past the restore point (the store keeps only the
// newest image). Their image reads are cut into quanta and take turns
// (fair.go), so concurrent restores share the disk evenly and a sweep never
// starves another host's faults; faults read with random-access hints,
// sweeps with sequential read-ahead.
package backup
