// Package wire is the framed binary protocol between a host (backupclient)
// and a backup server (backup). It only encodes and decodes; it knows
// nothing of sockets beyond io.Reader and io.Writer, and nothing of storage.
//
// Every frame is
//
//	u32 length (big endian) | u8 type | payload
//
// where length counts the type byte and the payload and never exceeds
// MaxFrame. A session is: client Hello, server Welcome, then any number of
// Extent and StateChunk frames for an epoch closed by Commit, each Commit
// answered by an Ack. A restoring host also sends Fetch frames for
// committed pages (or device state), each answered by Pages, in order.
// Either side may send Error and close.
//
// A restore session is read-only and separate from the VM's writer
// session (which it never takes over): client RestoreHello, server
// RestoreWelcome and Runs frames (the restore point's non-zero pages and
// the epoch that last wrote each run, so zero pages never cross the wire
// and a prefetcher can bring the most recently dirtied first), then Fetch
// frames answered by RestorePages (image pages with the stored CRC and
// epoch of each page, so the client can tell a damaged stored copy from a
// damaged transfer) or Pages (device state), and Ping answered by Pong,
// all in request order.
//
// The decoder is the first thing network input meets, so it is strict:
// unknown types, short or long payloads, oversize frames, bad names and
// lengths that disagree are errors wrapping ErrMalformed, never panics
// (see the fuzz targets).
package wire
