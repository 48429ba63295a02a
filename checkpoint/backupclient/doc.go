// Package backupclient is the host's side of the backup path: one Stream
// per VM carries the VM's dirty pages (from memfs) and device state to its
// backup server over mutual TLS, commits epochs, measures the bandwidth the
// flush controller needs, and after a failure reconnects and re-sends what
// the backup has not acknowledged.
//
// What is unacknowledged is tracked page by page (a pageset per epoch in
// flight); the contents are not kept: on resync they are read again from
// the VM's RAM file (Config.Source), which holds the newest version of
// every page. Sending a newer version than the one lost is correct: the
// backup only has to hold, at the final commit, what the paused guest has.
//
// A RestoreConn is the other direction: a read-only restore session
// (DialRestore) that fetches a restore point's page map, device state and
// pages with their stored sums, pipelined. It does not reconnect or judge
// pages; package restore does both.
package backupclient
