package protect

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/memserver"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/valid"
	"hostd/hostd/vm"
	"hostd/xen"
	"hostd/xen/qemu"
)

// After says what becomes of the VM once its restore point is committed.
type After string

const (
	AfterPause   After = "pause"   // stays paused: it must not diverge from the restore point (default)
	AfterDestroy After = "destroy" // powered off; definition and memory stay
	AfterResume  After = "resume"  // runs on (a drill, or a crash-consistent epoch)
)

// EvacuateRequest is the body of POST /v1/vms/{name}/evacuate and of
// POST /v1/host/evacuate.
type EvacuateRequest struct {
	// Deadline by which the restore point must be committed; default now +
	// the VM's bound.
	Deadline time.Time `json:"deadline,omitzero"`
	After    After     `json:"after,omitempty"`
}

// Phase is one step of an evacuation.
type Phase struct {
	Name       string  `json:"name"`
	StartMS    float64 `json:"start_ms"` // since the evacuation began
	DurationMS float64 `json:"duration_ms"`
	Bytes      int64   `json:"bytes,omitempty"`
}

// Report is an evacuation's (or epoch's) final report.
type Report struct {
	VM     string  `json:"vm"`
	Backup string  `json:"backup"`
	ID     string  `json:"id"`
	Epoch  uint64  `json:"epoch"`
	After  After   `json:"after"`
	Phases []Phase `json:"phases"`
	// TotalMS is from the start to the durable commit; BoundMS the time the
	// deadline allowed; BoundHeld whether the first fit in the second.
	TotalMS   float64 `json:"total_ms"`
	BoundMS   float64 `json:"bound_ms"`
	BoundHeld bool    `json:"bound_held"`
	// PauseMS is how long the guest was stopped before the commit.
	PauseMS float64 `json:"pause_ms"`
	// PredictedMS is what the memory server predicted at the start.
	PredictedMS    float64 `json:"predicted_ms"`
	UnflushedBytes int64   `json:"unflushed_bytes_at_start"`
}

// HostReport is the final report of a host evacuation.
type HostReport struct {
	VMs       []Report          `json:"vms"`
	Failed    map[string]string `json:"failed,omitempty"`
	TotalMS   float64           `json:"total_ms"`
	BoundHeld bool              `json:"bound_held"`
}

// Evacuate starts an evacuation job for one protected VM.
func (m *Manager) Evacuate(ctx context.Context, name string, req EvacuateRequest) (jobs.Job, error) {
	op := fmt.Sprintf("evacuate VM %q", name)
	rec, err := m.checkEvacuation(ctx, name, &req)
	if err != nil {
		return jobs.Job{}, fmt.Errorf("%s: %w", op, err)
	}
	return m.jobs.Start(m.ctx, "evacuate", name, func(ctx context.Context, p *jobs.Progress) (any, error) {
		return m.evacuate(ctx, rec, req, p, false)
	})
}

func (m *Manager) checkEvacuation(ctx context.Context, name string, req *EvacuateRequest) (Record, error) {
	switch req.After {
	case "":
		req.After = AfterPause
	case AfterPause, AfterDestroy, AfterResume:
	default:
		return Record{}, fmt.Errorf("%w: after %q is not pause, destroy or resume", vm.ErrInvalid, req.After)
	}
	if !req.Deadline.IsZero() && !req.Deadline.After(time.Now()) {
		return Record{}, fmt.Errorf("%w: deadline %s has passed", vm.ErrInvalid, req.Deadline.Format(time.RFC3339Nano))
	}
	if !req.Deadline.IsZero() && req.Deadline.After(time.Now().Add(maxBound)) {
		return Record{}, fmt.Errorf("%w: deadline %s is more than %v away", vm.ErrInvalid, req.Deadline.Format(time.RFC3339Nano), maxBound)
	}
	if err := valid.VMName(name); err != nil {
		return Record{}, err
	}
	v, _, err := m.served(ctx, name)
	if err != nil {
		return Record{}, err
	}
	rec, err := getRecord(m, name)
	if err != nil {
		return Record{}, err
	}
	if v.State != xen.StateRunning {
		return Record{}, fmt.Errorf("%w (it is %s): only a running guest can be evacuated; its last restore point stays restorable", ErrNotRunning, v.State)
	}
	return rec, nil
}

// EvacuateHost evacuates every protected VM at once, as one job. Their
// flushes share the host's backup bandwidth by weight (see Shares).
func (m *Manager) EvacuateHost(ctx context.Context, req EvacuateRequest) (jobs.Job, error) {
	recs, err := listRecords(m)
	if err != nil {
		return jobs.Job{}, fmt.Errorf("evacuate host: %w", err)
	}
	if len(recs) == 0 {
		return jobs.Job{}, fmt.Errorf("evacuate host: %w: no VM is protected", ErrNotProtected)
	}
	checked := make([]Record, 0, len(recs))
	for _, r := range recs {
		rq := req
		if _, err := m.checkEvacuation(ctx, r.VM, &rq); err != nil {
			return jobs.Job{}, fmt.Errorf("evacuate host: VM %q: %w", r.VM, err)
		}
		req.After = rq.After
		checked = append(checked, r)
	}
	return m.jobs.Start(m.ctx, "evacuate-host", "", func(ctx context.Context, p *jobs.Progress) (any, error) {
		t0 := time.Now()
		var mu sync.Mutex
		out := HostReport{Failed: map[string]string{}, BoundHeld: true}
		var wg sync.WaitGroup
		for _, r := range checked {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rep, err := m.evacuate(ctx, r, req, nil, false)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					out.Failed[r.VM], out.BoundHeld = err.Error(), false
					return
				}
				out.VMs = append(out.VMs, rep)
				out.BoundHeld = out.BoundHeld && rep.BoundHeld
				p.Set(float64(len(out.VMs)+len(out.Failed))/float64(len(checked)), "evacuating")
			}()
		}
		wg.Wait()
		out.TotalMS = ms(time.Since(t0))
		if len(out.Failed) > 0 {
			return out, fmt.Errorf("evacuate host: %d of %d VMs failed", len(out.Failed), len(checked))
		}
		return out, nil
	})
}

// evacuate takes a restore point: pause, then the final flush and the
// device state at once, then the restorable commit. epoch marks a
// crash-consistent epoch (always resumed, flushed once before the pause to
// keep the pause short). If anything fails before the commit the VM is
// resumed: a failed evacuation must not leave a running service stopped.
func (m *Manager) evacuate(ctx context.Context, rec Record, req EvacuateRequest, p *jobs.Progress, epoch bool) (Report, error) {
	name := rec.VM
	op := fmt.Sprintf("evacuate VM %q", name)
	if epoch {
		op = fmt.Sprintf("epoch of VM %q", name)
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()

	t0 := time.Now()
	deadline := req.Deadline
	if deadline.IsZero() {
		deadline = t0.Add(rec.Bound.Duration)
	}
	rep := Report{VM: name, Backup: rec.Backup, ID: rec.ID, After: req.After, BoundMS: ms(deadline.Sub(t0))}
	phase := func(n string, start time.Time, bytes int64) {
		rep.Phases = append(rep.Phases, Phase{Name: n, StartMS: ms(start.Sub(t0)), DurationMS: ms(time.Since(start)), Bytes: bytes})
	}
	set := func(f float64, n string) {
		if p != nil {
			p.Set(f, n)
		}
	}
	v, c, err := m.served(ctx, name)
	if err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}
	dom := v.Domain()
	if v.State != xen.StateRunning {
		return rep, fmt.Errorf("%s: %w: the VM is %s, not running", op, xen.ErrState, v.State)
	}
	st, err := c.Status(ctx)
	if err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}
	if st.State == memserver.StateUnprotected || st.State == memserver.StateCopying {
		return rep, fmt.Errorf("%s: %w: protection is %s; wait for the first copy", op, xen.ErrState, st.State)
	}
	rep.PredictedMS, rep.UnflushedBytes = ms(st.PredictedEvacuation), st.Unflushed

	if !epoch {
		// A deadline tightens the cap at once: less is left for the pause.
		set(0.05, "notice")
		s := time.Now()
		if err := c.Notice(ctx, deadline); err != nil {
			return rep, fmt.Errorf("%s: notice: %w", op, err)
		}
		phase("notice", s, 0)
	} else {
		s := time.Now()
		r, err := c.Sync(ctx)
		if err != nil {
			return rep, fmt.Errorf("%s: flush before the pause: %w", op, err)
		}
		phase("preflush", s, r.Bytes)
	}

	set(0.1, "pause")
	s := time.Now()
	if err := m.hv.Suspend(ctx, dom); err != nil {
		return rep, fmt.Errorf("%s: pause: %w", op, err)
	}
	paused := s
	phase("pause", s, 0)
	resumed, committed := false, false
	defer func() {
		// Before the commit a failure resumes the guest (nothing was
		// gained by stopping it); after it, only "resume" does.
		if !resumed && ((!committed && err != nil) || (committed && req.After == AfterResume)) {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if rerr := m.hv.Resume(rctx, dom); rerr != nil {
				m.log.Error("resume after evacuation", "vm", name, "err", rerr)
			}
		}
	}()

	set(0.3, "flush+state")
	var (
		wg      sync.WaitGroup
		syncRep memserver.SyncReport
		syncErr error
		qstate  []byte
		saveErr error
		syncS   = time.Now()
		syncD   time.Duration
		saveD   time.Duration
	)
	wg.Add(2)
	go func() {
		defer wg.Done()
		syncRep, syncErr = c.Sync(ctx)
		syncD = time.Since(syncS)
	}()
	go func() {
		defer wg.Done()
		qstate, saveErr = m.saveDeviceState(ctx, dom)
		saveD = time.Since(syncS)
	}()
	wg.Wait()
	if err = errors.Join(syncErr, saveErr); err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}
	rep.Phases = append(rep.Phases,
		Phase{Name: "flush", StartMS: ms(syncS.Sub(t0)), DurationMS: ms(syncD), Bytes: syncRep.Bytes},
		Phase{Name: "state", StartMS: ms(syncS.Sub(t0)), DurationMS: ms(saveD), Bytes: int64(len(qstate))})

	set(0.8, "commit")
	s = time.Now()
	var blob []byte
	blob, err = EncodeState(Saved{Name: name, Spec: v.Spec}, qstate)
	if err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}
	var cr memserver.CommitReport
	cr, err = c.Commit(ctx, blob)
	if err != nil {
		return rep, fmt.Errorf("%s: commit: %w", op, err)
	}
	committed = true
	phase("commit", s, int64(len(blob)))
	rep.Epoch = cr.Epoch
	rep.TotalMS = ms(time.Since(t0))
	rep.PauseMS = ms(time.Since(paused))
	rep.BoundHeld = !time.Now().After(deadline)

	set(0.95, string(req.After))
	s = time.Now()
	switch req.After {
	case AfterResume:
		err = m.hv.Resume(ctx, dom)
		resumed = err == nil
		if resumed && !epoch {
			// The guest runs on under its own bound again.
			if nerr := c.Notice(ctx, time.Time{}); nerr != nil {
				m.log.Warn("withdraw the evacuation's notice", "vm", name, "err", nerr)
			}
		}
	case AfterDestroy:
		err = m.hv.Destroy(ctx, dom)
	}
	if err != nil {
		// The restore point is committed; report it with the failure.
		return rep, fmt.Errorf("%s: committed epoch %d, then %s failed: %w", op, cr.Epoch, req.After, err)
	}
	if req.After != AfterPause {
		phase(string(req.After), s, 0)
	}
	kind := "vm.evacuated"
	if epoch {
		kind = "protection.epoch"
		m.hist.epochPause.Observe(rep.PauseMS / 1000)
	} else {
		m.hist.evacuation.WithLabelValues(strconv.FormatBool(rep.BoundHeld)).Observe(rep.TotalMS / 1000)
	}
	m.ev.Publish(events.Event{Type: kind, VM: name, Data: rep})
	m.log.Info(kind, "vm", name, "epoch", rep.Epoch, "total_ms", rep.TotalMS, "bound_ms", rep.BoundMS, "bound_held", rep.BoundHeld, "pause_ms", rep.PauseMS, "flushed_bytes", syncRep.Bytes)
	return rep, nil
}

// saveDeviceState has QEMU write the paused VM's device state (RAM is
// shared and skipped, x-ignore-shared) into a memfd and returns it.
func (m *Manager) saveDeviceState(ctx context.Context, name string) ([]byte, error) {
	q, f, err := m.migration(ctx, "save device state", name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := q.SaveDeviceState(ctx, name, f); err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("save device state: %w", err)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("save device state: read back: %w", err)
	}
	return b, nil
}

// migration prepares what both directions of device state need: QEMU's
// monitor with x-ignore-shared set (the guest's RAM is the shared file,
// never part of the stream; both sides must agree) and a memfd to pass it.
func (m *Manager) migration(ctx context.Context, op, name string) (*qemu.Client, *os.File, error) {
	mon := m.hv.Monitor()
	if mon == nil {
		return nil, nil, fmt.Errorf("%s: %w: this hypervisor has no QEMU monitor", op, xen.ErrUnavailable)
	}
	q := qemu.New(mon)
	if err := q.SetMigrationCapabilities(ctx, name, map[string]bool{"x-ignore-shared": true}); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	fd, err := unix.MemfdCreate("hostd-state-"+name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: memfd: %w", op, err)
	}
	return q, os.NewFile(uintptr(fd), "state"), nil
}

// Notice handles a termination notice: the event goes out, and every
// protected VM is evacuated before the deadline (if any is protected).
func (m *Manager) Notice(ctx context.Context, provider any, action string, deadline time.Time) {
	data := map[string]any{"provider": provider, "action": action, "deadline": deadline}
	j, err := m.EvacuateHost(ctx, EvacuateRequest{Deadline: deadline})
	if err != nil {
		data["evacuation_error"] = err.Error()
	} else {
		data["job"] = j.ID
	}
	m.ev.Publish(events.Event{Type: "host.termination_notice", Data: data})
}
