// Package store is hostd's embedded state store: one bbolt file under the
// state directory, with a bucket per kind of record (VMs, jobs, and later
// protection and connector state), values as JSON.
//
// bbolt gives atomic, fsynced transactions in a single file with no server,
// so a kill -9 at any moment leaves either the old or the new record, never a
// torn one. The daemon is the only writer; bbolt's file lock makes a second
// daemon on the same state directory fail fast instead of corrupting it.
package store
