// Package nbd serves a block device over the Network Block Device protocol
// (fixed newstyle handshake, simple replies) on a unix socket, so that an
// unmodified QEMU attaches it as a guest disk. It is the transport of
// cooperative swap (issue 6): dataplane/swapdev implements Backend, and
// hostd serves one Server per VM swap device.
//
// What a client gets: one export of Backend.Size() bytes, flags
// HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM, block sizes minimum 512,
// preferred 4096, maximum Options.MaxRequest (32 MiB). Options:
// EXPORT_NAME, INFO, GO, LIST, ABORT; everything else (STARTTLS, structured
// replies, meta contexts) is answered NBD_REP_ERR_UNSUP, so QEMU falls back
// to simple replies. Commands: READ, WRITE (with FUA), FLUSH, TRIM, DISC.
//
// Validation is strict: a malformed handshake closes the connection; a
// request with a bad magic, unknown flags on a write we cannot skip, or a
// write payload above MaxRequest disconnects (the stream cannot be
// resynchronised); a request out of bounds, not 512-aligned, too large, or
// of an unsupported type gets EINVAL (ENOTSUP for known but unoffered
// commands). Requests run concurrently (up to Options.MaxInFlight per
// connection, QEMU pipelines) and each reply carries its request's handle,
// so replies may come back in any order, as the protocol allows. DISC
// waits for the requests in flight before closing.
//
// Backend errors become NBD error codes: an error wrapping syscall.ENOSPC
// is ENOSPC, EINVAL is EINVAL, EPERM/EROFS are EPERM, anything else EIO.
//
// Wiring (hostd):
//
//	ln, _ := net.Listen("unix", "/run/hostd/vms/<id>/swap.sock") // chmod for the qemu user
//	srv, _ := nbd.NewServer(dev, nbd.Options{Logger: log})      // dev: *swapdev.Device
//	go srv.Serve(ctx, ln)                                        // returns when ctx ends
//
// and the domain gets
//
//	<disk type='network' device='disk'>
//	  <driver name='qemu' type='raw' cache='none'/>
//	  <source protocol='nbd'><host transport='unix' socket='/run/hostd/vms/<id>/swap.sock'/></source>
//	  <target dev='vdb' bus='virtio'/>
//	</disk>
//
// (or -blockdev driver=nbd,server.type=unix,server.path=...). Client is a
// small pipelining client for tests, benchmarks and probes.
package nbd
