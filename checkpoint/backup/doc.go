// Package backup is the `backup` role's network server: it accepts the
// page streams of many VMs from many hosts over mutual TLS 1.3, speaks the
// wire protocol, and stores into a backupstore. It acknowledges a commit
// only after the store has made the epoch durable (fsync), so a host may
// forget anything the backup has acknowledged.
//
// One session per VM at a time: a host that reconnects (after a network
// failure, or because the VM moved) takes the VM over from a stale session,
// whose open epoch is discarded.
package backup
