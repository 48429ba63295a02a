package memserver

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"

	"hostd/checkpoint/pki"
	"hostd/checkpoint/restore"
)

// maxAnswer bounds a control answer: the restore point's device state is
// the largest (hundreds of KiB for a small guest).
const maxAnswer = 64 << 20

const pathRestoreState = "/v1/restore/state"

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

func (s *server) restoreRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET "+pathRestoreState, func(w http.ResponseWriter, _ *http.Request) {
		if s.restore == nil {
			w.WriteHeader(http.StatusConflict)
			_, _ = w.Write([]byte(`{"error":"this memory server was not started from a backup"}`))
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(s.restore.r.State())
	})
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
