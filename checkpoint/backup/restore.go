package backup

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/wire"
)

// runsPerFrame bounds a Runs frame (1.3 MB).
const runsPerFrame = 64 << 10

// serveRestore runs a read-only restore session: it never begins an
// epoch, never registers as the VM's session (the VM's writer, if any,
// keeps streaming undisturbed) and only reads the store.
func (s *Server) serveRestore(ctx context.Context, log *slog.Logger, conn *tls.Conn, hello *wire.RestoreHello, r *wire.Reader, w *wire.Writer) {
	log = log.With("vm", hello.VMID, "restore_epoch", hello.Epoch, "resume", hello.Resume)
	if hello.Version != wire.Version {
		s.sendError(w, wire.CodeProtocol, fmt.Sprintf("protocol version %d, server speaks %d", hello.Version, wire.Version))
		return
	}
	st := &restoreStats{}
	err := s.restoreSession(ctx, log, hello, r, w, st)
	switch {
	case errors.Is(err, io.EOF):
		log.Info("restore session ended", "fetches", st.fetches, "bytes", st.bytes)
	case ctx.Err() != nil:
		log.Info("restore session closed by shutdown")
	default:
		log.Warn("restore session failed", "err", err, "fetches", st.fetches, "bytes", st.bytes)
		s.sendError(w, codeOf(err), err.Error())
		linger(conn)
	}
}

type restoreStats struct {
	fetches, bytes int64
}

// restorePoint picks the epoch a fresh restore serves and checks that the
// image still holds it. The store keeps one image, the newest committed
// epoch's; it equals the restore point's memory only if no later epoch
// wrote a page.
func restorePoint(m *backupstore.Manifest, rm backupstore.RestoreMap, want uint64) (uint64, error) {
	if m.StateEpoch == 0 {
		return 0, &protoError{wire.CodeNotFound, fmt.Sprintf("no restore point: epoch %d is committed but no epoch was committed paused with device state", m.Epoch)}
	}
	e := m.StateEpoch
	if want != 0 && want != e {
		return 0, &protoError{wire.CodeNotFound, fmt.Sprintf("restore point %d is not held: this backup keeps only its newest restore point, epoch %d (restore that one, epoch 0)", want, e)}
	}
	if m.Epoch > e {
		if rm.MaxEpoch > e {
			return 0, &protoError{wire.CodeNotFound, fmt.Sprintf("restore point %d is gone: epoch %d rewrote pages after it and the backup keeps only the newest image (evacuate again for a new restore point)", e, rm.MaxEpoch)}
		}
		if rm.Unknown > 0 {
			return 0, &protoError{wire.CodeNotFound, fmt.Sprintf("restore point %d cannot be proven intact: epoch %d came after it and %d pages were stored without their epoch", e, m.Epoch, rm.Unknown)}
		}
	}
	return e, nil
}

func (s *Server) restoreSession(ctx context.Context, log *slog.Logger, hello *wire.RestoreHello, r *wire.Reader, w *wire.Writer, st *restoreStats) error {
	vm, err := s.store.VM(hello.VMID, 0, false)
	if errors.Is(err, backupstore.ErrNotFound) {
		return &protoError{wire.CodeNotFound, fmt.Sprintf("this backup holds no vm %q", hello.VMID)}
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", hello.VMID, err)
	}
	var m *backupstore.Manifest
	var rm backupstore.RestoreMap
	if hello.Resume {
		// No map to send: the last commit is all that matters.
		if err = vm.Sync(ctx); err == nil {
			if m = vm.Committed(); m == nil {
				err = backupstore.ErrNotFound
			}
		}
	} else {
		m, rm, err = vm.RestoreMap(ctx)
	}
	if errors.Is(err, backupstore.ErrNotFound) {
		return &protoError{wire.CodeNotFound, fmt.Sprintf("vm %q has no committed epoch", hello.VMID)}
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", hello.VMID, err)
	}
	welcome := &wire.RestoreWelcome{Committed: m.Epoch, ImageSize: uint64(vm.Size())}
	if hello.Resume {
		// The client holds map and state; pages are checked one by one
		// against its epoch, so later epochs (the restored VM protected
		// again) do not matter; a backup that lost the epoch does.
		if m.Epoch < hello.Epoch {
			return &protoError{wire.CodeNotFound, fmt.Sprintf("the backup's last committed epoch is %d, older than restore point %d (it lost committed data)", m.Epoch, hello.Epoch)}
		}
		welcome.Epoch = hello.Epoch
	} else {
		if welcome.Epoch, err = restorePoint(m, rm, hello.Epoch); err != nil {
			return err
		}
		welcome.StateLen, welcome.StateCRC = uint64(m.StateLen), m.StateCRC
		welcome.Pages, welcome.Runs = uint64(rm.Pages), uint64(len(rm.Runs))
	}
	if err := w.Write(welcome); err != nil {
		return err
	}
	if !hello.Resume {
		for i := 0; i < len(rm.Runs); i += runsPerFrame {
			part := rm.Runs[i:min(len(rm.Runs), i+runsPerFrame)]
			f := &wire.Runs{Runs: make([]wire.Run, len(part))}
			for j, x := range part {
				f.Runs[j] = wire.Run{First: uint64(x.First), Count: uint32(x.Count), Epoch: x.Epoch}
			}
			if err := w.Write(f); err != nil {
				return err
			}
		}
	}
	if err := w.Flush(); err != nil {
		return err
	}
	log.Info("restore session open", "epoch", welcome.Epoch, "committed", m.Epoch, "pages", welcome.Pages)

	sess := &fairSession{}
	var buf []byte
	var info []backupstore.PageInfo
	var sums []wire.PageSum
	for {
		msg, err := r.Read()
		if err != nil {
			return fmt.Errorf("restore %s: %w", hello.VMID, err)
		}
		switch f := msg.(type) {
		case *wire.Fetch:
			st.fetches++
			if f.State {
				if err := s.serveRestoreState(vm, welcome.Epoch, f, w); err != nil {
					return err
				}
				break
			}
			n := int(f.Length)
			if cap(buf) < n {
				buf = make([]byte, n)
				info = make([]backupstore.PageInfo, n/wire.PageSize)
				sums = make([]wire.PageSum, n/wire.PageSize)
			}
			data, in, out := buf[:n], info[:n/wire.PageSize], sums[:n/wire.PageSize]
			if err := s.readFair(ctx, sess, vm, data, int64(f.Offset), in, f.Sequential); err != nil {
				return err
			}
			var bad int
			for i, pi := range in {
				out[i] = wire.PageSum{CRC: pi.CRC, Epoch: pi.Epoch}
				if wire.Checksum(data[i*wire.PageSize:(i+1)*wire.PageSize]) != pi.CRC {
					bad++
				}
			}
			if bad > 0 {
				// The restoring host checks every page and refuses these;
				// the operator should know the disk is damaged.
				log.Error("image pages fail their stored checksums; the restoring host will refuse them", "offset", f.Offset, "pages", bad)
			}
			if err := w.Write(&wire.RestorePages{ID: f.ID, Offset: f.Offset, CRC: wire.RestorePagesCRC(out, data), Sums: out, Data: data}); err != nil {
				return err
			}
			st.bytes += int64(n)
		case *wire.Ping:
			if err := w.Write(&wire.Pong{ID: f.ID}); err != nil {
				return err
			}
		case *wire.Error:
			return fmt.Errorf("restore %s: client reports: %w", hello.VMID, f)
		default:
			return &protoError{wire.CodeProtocol, fmt.Sprintf("unexpected %s frame in restore session", msg.Type())}
		}
		// Answers go out at once, except a sweep's while more requests
		// are already waiting (they share a flush); a fault's answer never
		// waits for the reads queued behind it.
		if f, ok := msg.(*wire.Fetch); !ok || !f.Sequential || r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
	}
}

// readFair reads p at off in quanta, each in its turn among all restore
// sessions.
func (s *Server) readFair(ctx context.Context, sess *fairSession, vm *backupstore.VM, p []byte, off int64, info []backupstore.PageInfo, sequential bool) error {
	for done := 0; done < len(p); {
		n := min(s.quant, len(p)-done)
		release, err := s.fair.acquire(ctx, sess)
		if err != nil {
			return err
		}
		err = vm.ReadRestore(ctx, p[done:done+n], off+int64(done), info[done/wire.PageSize:(done+n)/wire.PageSize], sequential)
		release()
		if err != nil {
			return err
		}
		done += n
	}
	return nil
}

// serveRestoreState answers a Fetch of the restore point's device state.
func (s *Server) serveRestoreState(vm *backupstore.VM, epoch uint64, f *wire.Fetch, w *wire.Writer) error {
	blob, m, err := vm.DeviceState()
	if err != nil {
		return err
	}
	if m.StateEpoch != epoch {
		return &protoError{wire.CodeNotFound, fmt.Sprintf("device state of restore point %d was superseded by epoch %d's", epoch, m.StateEpoch)}
	}
	if f.Offset >= uint64(len(blob)) {
		return &protoError{wire.CodeProtocol, fmt.Sprintf("fetch of device state at %d, blob has %d bytes", f.Offset, len(blob))}
	}
	data := blob[f.Offset:min(uint64(len(blob)), f.Offset+uint64(f.Length))]
	return w.Write(&wire.Pages{ID: f.ID, Offset: f.Offset, CRC: wire.Checksum(data), Data: data})
}
