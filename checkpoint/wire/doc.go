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
// The decoder is the first thing network input meets, so it is strict:
// unknown types, short or long payloads, oversize frames, bad names and
// lengths that disagree are errors wrapping ErrMalformed, never panics
// (see the fuzz targets).
package wire
