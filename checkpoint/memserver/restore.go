package memserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"

	"hostd/checkpoint/memfs"
	"hostd/checkpoint/pki"
	"hostd/checkpoint/restore"
)

// maxAnswer bounds a control answer: the restore point's device state is
// the largest (hundreds of KiB for a small guest).
const maxAnswer = 64 << 20

// Paths of the restore part of the control API.
const (
	pathRestoreState    = "/v1/restore/state"
	pathRestoreClaim    = "/v1/restore/claim"
	pathRestorePrefetch = "/v1/restore/prefetch"
)

// restoring is a memory server started from a backup's restore point: its
// memfs Source is the Restorer, which fetches what the cache file lacks.
type restoring struct {
	cfg Restore
	r   *restore.Restorer

	mu     sync.Mutex
	events []restore.Event // the latest, for hostd's event stream
	seq    int64
}

// maxRestoreEvents bounds the events kept for Status.
const maxRestoreEvents = 32

// openRestore connects to the backup and reads the restore point's page
// map and device state; in full mode it also copies every page into the
// cache file before returning (the guest may start only after).
func openRestore(ctx context.Context, cfg Config, log *slog.Logger) (*restoring, error) {
	rc := *cfg.Restore
	op := fmt.Sprintf("restore %s from %s", rc.ID, rc.Backup)
	if rc.Mode != "lazy" && rc.Mode != "full" {
		return nil, fmt.Errorf("%s: mode %q is not lazy or full", op, rc.Mode)
	}
	sn := rc.TLS.ServerName
	if sn == "" {
		sn, _, _ = net.SplitHostPort(rc.Backup)
	}
	tc, err := pki.ClientConfig(rc.TLS.CA, rc.TLS.Cert, rc.TLS.Key, sn)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	rs := &restoring{cfg: rc}
	r, err := restore.Open(ctx, restore.Config{
		Backup: rc.Backup, TLS: tc, ID: rc.ID, Epoch: rc.Epoch, Size: cfg.Size,
		// Beside the mount point, on the state directory's disk: it must
		// last as long as the VM does.
		CacheFile:    filepath.Join(filepath.Dir(filepath.Clean(cfg.Dir)), "restore.cache"),
		PrefetchRate: rc.PrefetchRate, Logger: log,
		OnEvent: rs.record,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	rs.r = r
	if rc.Mode == "full" {
		if err := r.Full(ctx); err != nil {
			r.Close()
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	return rs, nil
}

func (rs *restoring) record(e restore.Event) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.seq++
	rs.events = append(rs.events, e)
	if len(rs.events) > maxRestoreEvents {
		rs.events = rs.events[len(rs.events)-maxRestoreEvents:]
	}
}

// fill adds the restore's progress to a status.
func (rs *restoring) fill(st *Status) {
	s := rs.r.Status()
	st.Resident, st.ResidentTotal, st.FaultCount, st.FullyResident = s.PresentBytes, s.TotalBytes, s.Faults, s.FullyResident
	st.Restore = &s
	rs.mu.Lock()
	st.RestoreEvents = append([]restore.Event(nil), rs.events...)
	st.RestoreEventSeq = rs.seq
	rs.mu.Unlock()
}

// sameRestorePoint reports whether protecting to backup/id continues the
// image this server was restored from: then only pages written since the
// restore need to be sent (the rest are the backup's own).
func (rs *restoring) sameRestorePoint(backup, id string, committed uint64) bool {
	return rs != nil && rs.cfg.Backup == backup && rs.cfg.ID == id && committed == rs.r.Epoch()
}

// restoring returns the restore this server serves from, if any.
func (s *server) restoring() *restoring {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restore
}

// startPrefetch starts a lazy restore's prefetcher once.
func (s *server) startPrefetch() {
	s.mu.Lock()
	rs, started := s.restore, s.prefetching
	s.prefetching = true
	s.mu.Unlock()
	if rs == nil || started || rs.cfg.Mode != "lazy" {
		return
	}
	s.log.Info("restore prefetch started")
	go func() {
		if err := rs.r.Run(s.ctx, s.fs); err != nil && s.ctx.Err() == nil {
			s.log.Error("restore prefetcher", "err", err)
		}
	}()
}

// slotSource is a warm slot's Source: zeros until the claim switches it to
// the restore point's (nothing should read before; claim checks).
type slotSource struct {
	mu  sync.RWMutex
	src memfs.Source
}

func (ss *slotSource) ReadPages(ctx context.Context, off int64, p []byte) error {
	ss.mu.RLock()
	src := ss.src
	ss.mu.RUnlock()
	return src.ReadPages(ctx, off, p)
}

func (ss *slotSource) set(src memfs.Source) {
	ss.mu.Lock()
	ss.src = src
	ss.mu.Unlock()
}

// claim makes a warm slot serve a restore point: the restore is opened
// (and in full mode copied) as a server started with it would, then the
// mount's Source switches to it. A slot whose file was read or written
// already is refused and stays unusable: the kernel may hold those pages,
// which would shadow the restore point's.
func (s *server) claim(rc Restore) error {
	op := "claim slot " + s.cfg.VM
	if err := s.lockOp(op); err != nil {
		return err
	}
	defer s.opMu.Unlock()
	if s.slot == nil {
		return conflict(fmt.Errorf("%s: this memory server is not a warm slot", op))
	}
	if s.restoring() != nil {
		return conflict(fmt.Errorf("%s: the slot is claimed already", op))
	}
	if st := s.fs.Stats(); st.Reads > 0 || st.Writes > 0 {
		return conflict(fmt.Errorf("%s: %w (%d reads, %d writes before the claim); restore cold instead", op, ErrSlotTouched, st.Reads, st.Writes))
	}
	cfg := s.cfg
	cfg.Restore = &rc
	// The server's context, not the request's: the restore outlives the claim.
	rs, err := openRestore(s.ctx, cfg, s.log)
	if err != nil {
		return badGateway(fmt.Errorf("%s: %w", op, err))
	}
	s.slot.set(rs.r.Source())
	s.mu.Lock()
	s.restore = rs
	s.mu.Unlock()
	if st := s.fs.Stats(); st.Reads > 0 || st.Writes > 0 {
		// Touched while the restore opened: too late to undo the switch;
		// the caller destroys the slot.
		return conflict(fmt.Errorf("%s: %w (%d reads, %d writes during the claim); restore cold instead", op, ErrSlotTouched, st.Reads, st.Writes))
	}
	s.log.Info("slot claimed", "backup", rc.Backup, "id", rc.ID, "epoch", rs.r.Epoch(), "mode", rc.Mode)
	if rc.Mode == "lazy" && !rc.DeferPrefetch {
		s.startPrefetch()
	}
	return nil
}

// ErrSlotTouched: a warm slot's RAM file was read or written before its
// claim.
var ErrSlotTouched = errors.New("the slot's memory was touched before its claim")

func (s *server) restoreRoutes(mux *http.ServeMux, handle func(string, func(*http.Request) (any, error))) {
	mux.HandleFunc("GET "+pathRestoreState, func(w http.ResponseWriter, _ *http.Request) {
		rs := s.restoring()
		if rs == nil {
			w.WriteHeader(http.StatusConflict)
			_, _ = w.Write([]byte(`{"error":"this memory server was not started from a backup"}`))
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(rs.r.State())
	})
	handle("POST "+pathRestoreClaim, func(r *http.Request) (any, error) {
		var rc Restore
		if err := decodeJSON(r, &rc); err != nil {
			return nil, err
		}
		return nil, s.claim(rc)
	})
	handle("POST "+pathRestorePrefetch, func(*http.Request) (any, error) {
		if s.restoring() == nil {
			return nil, conflict(fmt.Errorf("start prefetch: memory server of VM %s serves no restore", s.cfg.VM))
		}
		s.startPrefetch()
		return nil, nil
	})
}

// Claim makes a warm slot's memory server serve a restore point (see
// Config.Slot). In full mode it returns once every page is local.
func (c *Client) Claim(ctx context.Context, r Restore) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("claim slot: %w", err)
	}
	return c.do(ctx, "claim slot", http.MethodPost, pathRestoreClaim, "application/json", b, nil)
}

// StartPrefetch starts a lazy restore's prefetcher held by DeferPrefetch
// (a no-op if it runs).
func (c *Client) StartPrefetch(ctx context.Context) error {
	return c.do(ctx, "start prefetch", http.MethodPost, pathRestorePrefetch, "", nil, nil)
}

// RestoreState returns the device state of the restore point a memory
// server started from.
func (c *Client) RestoreState(ctx context.Context) ([]byte, error) {
	var b rawAnswer
	if err := c.do(ctx, "restore state", http.MethodGet, pathRestoreState, "", nil, &b); err != nil {
		return nil, err
	}
	return b, nil
}

// rawAnswer takes an answer body as it is.
type rawAnswer []byte
