package protect

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"time"

	"hostd/checkpoint/memserver"
	"hostd/hostd/config"
	"hostd/hostd/errdefs"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/store"
	"hostd/hostd/valid"
	"hostd/hostd/vm"
	"hostd/xen"
)

// Errors the API maps to status codes.
var (
	ErrNotProtected  = errdefs.New(errdefs.ErrConflict, "not_protected", "VM is not protected")
	ErrProtected     = errdefs.New(errdefs.ErrConflict, "protected", "VM is already protected")
	ErrNotServed     = errdefs.New(errdefs.ErrInvalid, "not_served", "VM's memory is not served by hostd")
	ErrNotConfigured = errdefs.New(errdefs.ErrNotImplemented, "not_configured", "protection is not configured on this host")
	ErrBackup        = errdefs.New(errdefs.ErrPeer, "backup_unavailable", "backup unavailable")
	// Failures of a backup, told apart so that a job says which it met.
	ErrRestorePoint   = errdefs.New(errdefs.ErrNotFound, "restore_point_not_found", "no such restore point at the backup")
	ErrBackupFull     = errdefs.New(errdefs.ErrPeer, "backup_full", "the backup's disk is full")
	ErrBackupProtocol = errdefs.New(errdefs.ErrPeer, "backup_protocol", "the backup broke the protocol")
	ErrBackupTLS      = errdefs.New(errdefs.ErrPeer, "backup_tls", "the TLS handshake with the backup failed")
	ErrBackupCorrupt  = errdefs.New(errdefs.ErrPeer, "backup_corrupt", "pages of the restore point are corrupt at the backup")
	// ErrNotRunning: the operation needs the VM's guest running.
	ErrNotRunning = errdefs.New(errdefs.ErrConflict, "not_running", "VM is not running")
	// ErrHasSwap: the VM swaps to a cooperative swap device, whose pages
	// an evacuation would not carry.
	ErrHasSwap = errdefs.New(errdefs.ErrConflict, "swap_and_protection", "VM has a cooperative swap device")
)

// Request is the body of PUT /v1/vms/{name}/protection.
type Request struct {
	Backup string `json:"backup"`       // host:port of a backup-role hostd
	ID     string `json:"id,omitempty"` // the VM's id at the backup; default its name
	// Bound is T, the evacuation guarantee; absent: checkpoint.default_bound
	// (a bound given as 0 is refused, not taken for the default).
	Bound *config.Duration `json:"bound,omitempty"`
	// EpochInterval > 0 takes a crash-consistent restore point that often
	// (a short pause); between them nothing is committed, so a revocation
	// without warning falls back to the last one.
	EpochInterval config.Duration `json:"epoch_interval,omitzero"`
	// Weight is the VM's share of the host's backup bandwidth; default 1.
	Weight float64 `json:"weight,omitempty"`
}

// Record is a protection as the store keeps it.
type Record struct {
	VM    string    `json:"vm"`
	Since time.Time `json:"since"`
	Request
}

// Status is the body of GET /v1/vms/{name}/protection.
type Status struct {
	Record
	State  memserver.State `json:"state"`
	Reason string          `json:"reason,omitempty"`

	UnflushedBytes  int64   `json:"unflushed_bytes"`
	CapBytes        int64   `json:"cap_bytes"`
	BandwidthBps    float64 `json:"bandwidth_bytes_per_s"`
	ShareBps        float64 `json:"share_bytes_per_s"` // 0: no host limit
	BoundMS         float64 `json:"bound_ms"`
	PredictedEvacMS float64 `json:"predicted_evacuation_ms"`
	HeadroomMS      float64 `json:"headroom_ms"`
	Notice          bool    `json:"notice"`
	CopyDone        int64   `json:"copy_done_bytes"`
	CopyTotal       int64   `json:"copy_total_bytes"`
	AckedEpoch      uint64  `json:"acked_epoch"`
	RestorableEpoch uint64  `json:"restorable_epoch"`
	Reconnects      int64   `json:"reconnects"`
	BytesSent       int64   `json:"bytes_sent"`
	// LastEpochPauseMS is the pause of the last crash-consistent epoch.
	LastEpochPauseMS float64 `json:"last_epoch_pause_ms,omitempty"`
}

// Manager runs protection, evacuation and restore for this host's VMs.
type Manager struct {
	cfg  config.Config
	hv   xen.Hypervisor
	vms  *vm.Manager
	mem  *Memories
	st   *store.Store
	ev   *events.Broker
	jobs *jobs.Manager
	log  *slog.Logger
	ctx  context.Context // the daemon's lifetime

	mu     sync.Mutex
	locks  map[string]*sync.Mutex        // one evacuation/epoch/change per VM at a time
	epochs map[string]context.CancelFunc // running epoch loops
	shares map[string]float64            // last share given, bytes/s
	pauses map[string]time.Duration      // last epoch pause
	sent   map[string]sample             // bytes sent at the last rebalance
	wg     sync.WaitGroup
	slots  *slots
	hist   histograms
}

// NewManager returns a manager; call Resume to re-attach existing
// protections, then Run for the background loops.
func NewManager(ctx context.Context, cfg config.Config, hv xen.Hypervisor, vms *vm.Manager, mem *Memories, st *store.Store, ev *events.Broker, jm *jobs.Manager, log *slog.Logger) *Manager {
	return &Manager{
		cfg: cfg, hv: hv, vms: vms, mem: mem, st: st, ev: ev, jobs: jm, log: log.With("component", "protect"), ctx: ctx,
		locks: map[string]*sync.Mutex{}, epochs: map[string]context.CancelFunc{},
		shares: map[string]float64{}, pauses: map[string]time.Duration{}, sent: map[string]sample{},
		slots: newSlots(cfg, vms, mem, log), hist: newHistograms(),
	}
}

// StartSlots removes the warm slots a previous hostd left and starts this
// host's in the background, until ctx ends; StopSlots then removes them.
func (m *Manager) StartSlots(ctx context.Context) { m.slots.start(ctx) }

// StopSlots removes the warm slots (after the StartSlots context ended).
func (m *Manager) StopSlots() { m.slots.stop() }

// Slots reports the configured warm slots (GET /v1/host).
func (m *Manager) Slots() []SlotStatus { return m.slots.status() }

func (m *Manager) lock(vmName string) *sync.Mutex {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.locks[vmName]
	if !ok {
		l = &sync.Mutex{}
		m.locks[vmName] = l
	}
	return l
}

// served returns the VM's record after checking that its RAM is served.
func (m *Manager) served(ctx context.Context, name string) (vm.VM, *memserver.Client, error) {
	v, err := m.vms.Get(ctx, name)
	if err != nil {
		return vm.VM{}, nil, err
	}
	if !v.ServedMemory {
		return v, nil, fmt.Errorf("VM %q: %w: create it with \"served_memory\": true to protect it (RAM cannot move under a running guest)", name, ErrNotServed)
	}
	c, err := m.memClient(ctx, name)
	if err != nil {
		return v, nil, fmt.Errorf("VM %q: %w", name, err)
	}
	return v, c, nil
}

// Limits of a protection request.
const (
	maxBound         = 24 * time.Hour
	minEpochInterval = time.Second
	maxWeight        = 1e6
)

// Validate checks a protection request's fields as given (before
// defaults): what it names must be usable, what it omits is defaulted.
// nested: the request is a restore's "protect", whose backup and id
// default to the restore's.
func (r Request) Validate(nested bool) error {
	switch {
	case r.Backup == "" && !nested:
		return fmt.Errorf("%w: backup (host:port of a backup-role hostd) is required", valid.ErrAddress)
	case r.Bound != nil && r.Bound.Duration <= 0:
		return fmt.Errorf("%w: bound %v must be positive (omit it for the host's default)", valid.ErrRequest, r.Bound)
	case r.Bound != nil && r.Bound.Duration > maxBound:
		return fmt.Errorf("%w: bound %v is longer than %v", valid.ErrRequest, r.Bound, maxBound)
	case r.EpochInterval.Duration < 0:
		return fmt.Errorf("%w: epoch_interval %v must not be negative", valid.ErrRequest, r.EpochInterval)
	case r.EpochInterval.Duration > 0 && r.EpochInterval.Duration < minEpochInterval:
		return fmt.Errorf("%w: epoch_interval %v is below %v; each epoch pauses the VM", valid.ErrRequest, r.EpochInterval, minEpochInterval)
	case r.Weight < 0 || r.Weight > maxWeight || math.IsNaN(r.Weight) || math.IsInf(r.Weight, 0):
		return fmt.Errorf("%w: weight %v must be positive and at most %g (omit it for 1)", valid.ErrRequest, r.Weight, maxWeight)
	}
	if r.Backup != "" {
		if err := valid.HostPort("backup", r.Backup); err != nil {
			return err
		}
	}
	if r.ID != "" {
		if err := valid.BackupID(r.ID); err != nil {
			return err
		}
	}
	return nil
}

// applyDefaults validates r and fills in what it omits for VM name.
func (m *Manager) applyDefaults(r *Request, name string) error {
	if err := r.Validate(false); err != nil {
		return err
	}
	if r.ID == "" {
		if err := valid.BackupID(name); err != nil {
			return err
		}
		r.ID = name
	}
	if r.Bound == nil {
		b := m.cfg.Checkpoint.DefaultBound
		r.Bound = &b
	}
	if r.Weight == 0 {
		r.Weight = 1
	}
	if !m.cfg.Checkpoint.TLS.Set() {
		return fmt.Errorf("%w: set [checkpoint] tls (ca, cert, key) in the configuration", ErrNotConfigured)
	}
	return nil
}

func (m *Manager) tlsFiles(backup string) memserver.TLSFiles {
	host, _, _ := net.SplitHostPort(backup)
	t := m.cfg.Checkpoint.TLS
	return memserver.TLSFiles{CA: t.CA, Cert: t.Cert, Key: t.Key, ServerName: host}
}

// protection is what a memory server is told for a record.
func (m *Manager) protection(r Record) memserver.Protection {
	commit := m.cfg.Checkpoint.CommitInterval.Duration
	if r.EpochInterval.Duration > 0 {
		commit = 0 // only restore points are committed
	}
	return memserver.Protection{
		Backup: r.Backup, ID: r.ID, TLS: m.tlsFiles(r.Backup),
		Bound: r.Bound.Duration, CommitInterval: commit, Rate: m.share(r.VM),
	}
}

// CopyReport is the final report of a protect job (the first full copy).
type CopyReport struct {
	Bytes      int64   `json:"bytes"`
	DurationMS float64 `json:"duration_ms"`
	State      string  `json:"state"`
}

// Protect starts protection. It returns once the memory server reached the
// backup; the first full copy is the returned job.
func (m *Manager) Protect(ctx context.Context, name string, req Request) (jobs.Job, error) {
	op := fmt.Sprintf("protect VM %q", name)
	if err := valid.VMName(name); err != nil {
		return jobs.Job{}, fmt.Errorf("%s: %w", op, err)
	}
	// The pages a guest swapped out live in its swap device, not its
	// memory: a restore elsewhere would find them missing (and QEMU's
	// device state would name a disk the restored domain lacks).
	if m.st.Has(store.BucketSwap, name) {
		return jobs.Job{}, fmt.Errorf("%s: %w: its swapped-out pages would not move with an evacuation; swapoff in the guest and DELETE /v1/vms/%s/swap first", op, ErrHasSwap, name)
	}
	if err := m.applyDefaults(&req, name); err != nil {
		return jobs.Job{}, fmt.Errorf("%s: %w", op, err)
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	v, c, err := m.served(ctx, name)
	if err != nil {
		return jobs.Job{}, fmt.Errorf("%s: %w", op, err)
	}
	// A guest that never ran, or was shut off, has no memory worth a
	// restore point and no device state an evacuation could save.
	if v.State != xen.StateRunning && v.State != xen.StatePaused {
		return jobs.Job{}, fmt.Errorf("%s: %w (it is %s): start it first (POST /v1/vms/%s/start)", op, ErrNotRunning, v.State, name)
	}
	if rec, err := store.Get[Record](m.st, store.BucketProtection, name); err == nil {
		return jobs.Job{}, fmt.Errorf("%s: %w (to %s since %s); DELETE its protection first", op, ErrProtected, rec.Backup, rec.Since.Format(time.RFC3339))
	}
	rec := Record{VM: name, Since: time.Now().UTC(), Request: req}
	if err := c.Protect(ctx, m.protection(rec)); err != nil {
		return jobs.Job{}, fmt.Errorf("%s: %w: %v", op, ErrBackup, err)
	}
	if err := store.Put(m.st, store.BucketProtection, name, rec); err != nil {
		_ = c.Unprotect(context.WithoutCancel(ctx))
		return jobs.Job{}, fmt.Errorf("%s: %w", op, err)
	}
	m.startEpochs(rec)
	m.ev.Publish(events.Event{Type: "protection.started", VM: name, Data: map[string]any{"backup": req.Backup, "bound": req.Bound.String()}})
	m.log.Info("protection started", "vm", name, "backup", req.Backup, "bound", req.Bound.Duration, "epoch_interval", req.EpochInterval.Duration)
	return m.jobs.Start(m.ctx, "protect", name, func(ctx context.Context, p *jobs.Progress) (any, error) {
		return m.waitCopy(ctx, name, c, p)
	})
}

// waitCopy follows the first full copy to its end.
func (m *Manager) waitCopy(ctx context.Context, name string, c *memserver.Client, p *jobs.Progress) (any, error) {
	t0 := time.Now()
	for {
		st, err := c.Status(ctx)
		if err != nil {
			return nil, fmt.Errorf("first copy of VM %q: %w", name, err)
		}
		if st.CopyTotal > 0 {
			p.Set(float64(st.CopyDone)/float64(st.CopyTotal), "copy")
		}
		if st.State != memserver.StateCopying {
			if st.State == memserver.StateUnprotected {
				return nil, fmt.Errorf("first copy of VM %q: protection ended: %s", name, st.Reason)
			}
			m.ev.Publish(events.Event{Type: "protection.copied", VM: name, Data: map[string]any{"bytes": st.CopyTotal, "state": st.State}})
			return CopyReport{Bytes: st.CopyTotal, DurationMS: ms(time.Since(t0)), State: string(st.State)}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("first copy of VM %q: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Unprotect stops protection; the VM keeps running on served memory.
func (m *Manager) Unprotect(ctx context.Context, name string) error {
	op := fmt.Sprintf("unprotect VM %q", name)
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	if _, err := store.Get[Record](m.st, store.BucketProtection, name); err != nil {
		return fmt.Errorf("%s: %w", op, ErrNotProtected)
	}
	m.stopEpochs(name)
	if c, err := m.memClient(ctx, name); err == nil {
		if err := c.Unprotect(ctx); err != nil {
			m.log.Warn("memory server refused to unprotect", "vm", name, "err", err)
		}
	}
	if err := m.st.Delete(store.BucketProtection, name); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	m.ev.Publish(events.Event{Type: "protection.stopped", VM: name})
	return nil
}

// Forget drops a deleted VM's protection (called before its memory server
// stops).
func (m *Manager) Forget(name string) {
	m.stopEpochs(name)
	_ = m.st.Delete(store.BucketProtection, name)
}

// Get reports a VM's protection.
func (m *Manager) Get(ctx context.Context, name string) (Status, error) {
	op := fmt.Sprintf("protection of VM %q", name)
	if _, err := m.vms.Get(ctx, name); err != nil {
		return Status{}, err
	}
	rec, err := store.Get[Record](m.st, store.BucketProtection, name)
	if err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, ErrNotProtected)
	}
	out := Status{Record: rec}
	c, err := m.memClient(ctx, name)
	if err != nil {
		out.State, out.Reason = memserver.StateDegraded, err.Error()
		return out, nil
	}
	st, err := c.Status(ctx)
	if err != nil {
		out.State, out.Reason = memserver.StateDegraded, err.Error()
		return out, nil
	}
	out.State, out.Reason = st.State, st.Reason
	out.UnflushedBytes, out.CapBytes, out.BandwidthBps, out.ShareBps = st.Unflushed, st.Cap, st.Bandwidth, st.Rate
	out.BoundMS, out.PredictedEvacMS, out.HeadroomMS, out.Notice = ms(st.Bound), ms(st.PredictedEvacuation), ms(st.Headroom), st.Notice
	out.CopyDone, out.CopyTotal = st.CopyDone, st.CopyTotal
	out.AckedEpoch, out.RestorableEpoch, out.Reconnects, out.BytesSent = st.AckedEpoch, st.RestorableEpoch, st.Reconnects, st.BytesSent
	m.mu.Lock()
	out.LastEpochPauseMS = ms(m.pauses[name])
	m.mu.Unlock()
	return out, nil
}

// List reports every protection.
func (m *Manager) List(ctx context.Context) ([]Status, error) {
	recs, err := store.List[Record](m.st, store.BucketProtection)
	if err != nil {
		return nil, fmt.Errorf("list protections: %w", err)
	}
	out := make([]Status, 0, len(recs))
	for _, r := range recs {
		s, err := m.Get(ctx, r.VM)
		if err != nil {
			s = Status{Record: r, State: memserver.StateDegraded, Reason: err.Error()}
		}
		out = append(out, s)
	}
	return out, nil
}

// Resume re-attaches to the memory servers of protected VMs after a hostd
// start and restarts their epoch loops. A protected VM whose memory server
// is gone is reported: its guest lost its memory with it.
func (m *Manager) Resume(ctx context.Context) {
	m.resumePrefetch(ctx)
	recs, err := store.List[Record](m.st, store.BucketProtection)
	if err != nil {
		m.log.Error("read protections", "err", err)
		return
	}
	for _, r := range recs {
		c, err := m.memClient(ctx, r.VM)
		if err != nil {
			m.log.Error("protected VM has no memory server; its protection is degraded", "vm", r.VM, "err", err)
			m.ev.Publish(events.Event{Type: "protection.degraded", VM: r.VM, Data: map[string]string{"reason": err.Error()}})
			continue
		}
		st, err := c.Status(ctx)
		if err == nil && st.State == memserver.StateUnprotected {
			// A memory server started anew (the VM was restarted): protect
			// it again; the backup resynchronises what it lacks.
			err = c.Protect(ctx, m.protection(r))
		}
		if err == nil {
			m.log.Info("protection resumed", "vm", r.VM, "state", st.State, "acked_epoch", st.AckedEpoch, "restorable_epoch", st.RestorableEpoch)
		}
		m.startEpochs(r)
	}
}

// resumePrefetch starts the prefetch of lazily restored VMs that are not
// resident yet: a hostd that died between a restore's resume and its
// StartPrefetch left it held (StartPrefetch is a no-op where it runs).
func (m *Manager) resumePrefetch(ctx context.Context) {
	vms, err := m.vms.List(ctx)
	if err != nil {
		m.log.Warn("list VMs to resume their restores' prefetch", "err", err)
		return
	}
	for _, v := range vms {
		if !v.Restored || !v.ServedMemory || v.State != xen.StateRunning {
			continue
		}
		c, err := m.mem.Client(ctx, v.Domain())
		if err != nil {
			continue
		}
		if st, err := c.Status(ctx); err == nil && st.Restore != nil && !st.FullyResident {
			if err := c.StartPrefetch(ctx); err != nil {
				m.log.Warn("resume a restore's prefetch", "vm", v.Name, "err", err)
			}
		}
	}
}

// Wait returns when background loops have ended (after the daemon's
// context is cancelled).
func (m *Manager) Wait() { m.wg.Wait() }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Serve implements vm.Memory: the VM's RAM comes from its memory server,
// named by the VM's domain.
func (m *Manager) Serve(ctx context.Context, domain string, size int64) (string, error) {
	return m.mem.Serve(ctx, domain, size)
}

// Release implements vm.Memory: a deleted VM's protection ends with it (the
// backup keeps its restore points), then its memory server stops.
func (m *Manager) Release(ctx context.Context, name, domain string) error {
	m.Forget(name)
	return m.mem.Release(ctx, domain)
}

// memClient returns the control client of a VM's memory server, which is
// named by the VM's domain (see vm.Record.Domain).
func (m *Manager) memClient(ctx context.Context, name string) (*memserver.Client, error) {
	return m.mem.Client(ctx, m.vms.DomainOf(name))
}
