package protect

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"time"

	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/memserver"
	"hostd/checkpoint/pki"
	"hostd/checkpoint/restore"
	"hostd/checkpoint/wire"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/valid"
	"hostd/xen"
)

// RestoreRequest is the body of POST /v1/vms/restore.
type RestoreRequest struct {
	Backup string `json:"backup"` // host:port of the backup holding the VM
	ID     string `json:"id"`     // the VM's id at the backup
	// Name of the restored VM on this host; default ID.
	Name  string `json:"name,omitempty"`
	Epoch uint64 `json:"epoch,omitempty"` // 0: the latest restore point
	// Mode "lazy" (default) resumes at once and brings pages on demand and
	// in the background; "full" copies everything first.
	Mode string `json:"mode,omitempty"`
	// PrefetchRate bounds the background prefetch (bytes/s; 0: unlimited).
	PrefetchRate float64 `json:"prefetch_rate,omitempty"`
	// Protect, if set, protects the restored VM as soon as it runs (to
	// the same backup and id: no recopy).
	Protect *Request `json:"protect,omitempty"`
	// Slot "auto" (default) restores into a warm slot the saved VM fits
	// if one is ready, else starts its own QEMU; "cold" always starts one.
	Slot string `json:"slot,omitempty"`
}

// RestoreReport is a restore job's final report.
type RestoreReport struct {
	VM     string  `json:"vm"`
	Backup string  `json:"backup"`
	ID     string  `json:"id"`
	Epoch  uint64  `json:"epoch"`
	Mode   string  `json:"mode"`
	Phases []Phase `json:"phases"`
	// ResumeMS is from the request to the guest running again;
	// ResidentMS to every page being local (the VM no longer needs the
	// backup).
	ResumeMS   float64 `json:"resume_ms"`
	ResidentMS float64 `json:"resident_ms"`
	// Bytes brought from the backup and lazy faults that waited for it.
	BytesFetched int64   `json:"bytes_fetched"`
	Faults       int64   `json:"remote_faults"`
	FaultP50US   float64 `json:"fault_p50_us"`
	FaultP99US   float64 `json:"fault_p99_us"`
	ProtectJob   string  `json:"protect_job,omitempty"`
	// Slot is the warm slot's domain the VM was restored into (and runs
	// in); empty for a cold restore, with ColdReason saying why.
	Slot       string `json:"slot,omitempty"`
	ColdReason string `json:"cold_reason,omitempty"`
}

// Validate checks a restore request as given, before defaults: every field
// it names must be usable, so that a request that cannot succeed is refused
// before a job, a file or a memory server exists.
func (r RestoreRequest) Validate() error {
	if r.Backup == "" {
		return fmt.Errorf("%w: backup (host:port of the backup holding the VM) is required", valid.ErrAddress)
	}
	if err := valid.HostPort("backup", r.Backup); err != nil {
		return err
	}
	if err := valid.BackupID(r.ID); err != nil {
		return err
	}
	if r.Name != "" {
		if err := valid.VMName(r.Name); err != nil {
			return err
		}
	} else if err := valid.VMName(r.ID); err != nil {
		return fmt.Errorf("%w (the name defaults to the id, which is not a VM name here: give \"name\")", err)
	}
	switch {
	case r.Mode != "" && r.Mode != "lazy" && r.Mode != "full":
		return fmt.Errorf("%w: mode %q is not lazy or full", valid.ErrRequest, r.Mode)
	case r.PrefetchRate < 0 || math.IsNaN(r.PrefetchRate) || math.IsInf(r.PrefetchRate, 0):
		return fmt.Errorf("%w: prefetch_rate must be a finite number of bytes/s, 0 for unlimited", valid.ErrRequest)
	case r.Slot != "" && r.Slot != "auto" && r.Slot != "cold":
		return fmt.Errorf("%w: slot %q is not auto or cold", valid.ErrRequest, r.Slot)
	}
	if r.Protect != nil {
		if err := r.Protect.Validate(true); err != nil {
			return fmt.Errorf("protect: %w", err)
		}
	}
	return nil
}

// Restore brings a VM back from a backup's restore point as a job. The
// name is reserved for the job's lifetime (vm.Manager.Reserve): a create or
// a second restore to the same name is refused, so that a failing restore
// cleans up only what it made.
func (m *Manager) Restore(ctx context.Context, req RestoreRequest) (jobs.Job, error) {
	t0 := time.Now()
	if err := req.Validate(); err != nil {
		return jobs.Job{}, fmt.Errorf("restore VM: %w", err)
	}
	if req.Name == "" {
		req.Name = req.ID
	}
	if req.Mode == "" {
		req.Mode = "lazy"
	}
	if req.Slot == "" {
		req.Slot = "auto"
	}
	op := fmt.Sprintf("restore VM %q", req.Name)
	if !m.cfg.Checkpoint.TLS.Set() {
		return jobs.Job{}, fmt.Errorf("%s: %w: set [checkpoint] tls (ca, cert, key) in the configuration", op, ErrNotConfigured)
	}
	release, err := m.vms.Reserve(ctx, req.Name)
	if err != nil {
		return jobs.Job{}, fmt.Errorf("%s: %w (name it otherwise with \"name\")", op, err)
	}
	// The restore point is read before the job: a restore of what the
	// backup does not hold, or from a backup that cannot be reached, is
	// refused at once with the cause's code rather than becoming a job
	// that fails. Its time counts in the job's report (t0).
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	pr, err := m.probe(pctx, req)
	cancel()
	if err != nil {
		release()
		return jobs.Job{}, fmt.Errorf("%s from %s: %w", op, req.Backup, err)
	}
	j, err := m.jobs.Start(m.ctx, "restore", req.Name, func(ctx context.Context, p *jobs.Progress) (any, error) {
		defer release()
		return m.restore(ctx, req, pr, t0, p)
	})
	if err != nil {
		release()
	}
	return j, err
}

// probeTimeout bounds the restore point's reading in the request.
const probeTimeout = 30 * time.Second

// probed is what a restore knows of its restore point before it starts.
type probed struct {
	info     backupclient.RestoreInfo
	saved    Saved
	qstate   []byte
	blobLen  int
	start    time.Time
	duration time.Duration
}

// probe reads the restore point's size, epoch and device state: the memory
// server serves exactly that epoch (a later commit must not change what is
// restored), and the saved spec decides whether a warm slot fits.
func (m *Manager) probe(ctx context.Context, req RestoreRequest) (probed, error) {
	pr := probed{start: time.Now()}
	files := m.tlsFiles(req.Backup)
	tc, err := pki.ClientConfig(files.CA, files.Cert, files.Key, files.ServerName)
	if err != nil {
		return pr, err
	}
	rc, err := backupclient.DialRestore(ctx, backupclient.RestoreConfig{Addr: req.Backup, TLS: tc, VMID: req.ID, Epoch: req.Epoch, Logger: m.log})
	if err != nil {
		return pr, backupError(err)
	}
	pr.info = rc.Info()
	blob, err := rc.FetchState(ctx)
	rc.Close()
	if err != nil {
		return pr, backupError(err)
	}
	if pr.saved, pr.qstate, err = DecodeState(blob); err != nil {
		return pr, err
	}
	if int64(pr.saved.Spec.MemoryMiB)<<20 != pr.info.ImageSize {
		return pr, fmt.Errorf("%w: the saved VM has %d MiB, the image %d bytes", ErrBadState, pr.saved.Spec.MemoryMiB, pr.info.ImageSize)
	}
	pr.blobLen, pr.duration = len(blob), time.Since(pr.start)
	return pr, nil
}

// backupError says what a failure to read from a backup was: the backup's
// own refusal (no such restore point, disk full), a frame that broke the
// protocol, a certificate refused, or a backup that cannot be reached.
func backupError(err error) error {
	var we *wire.Error
	var alert tls.AlertError
	var unknownCA x509.UnknownAuthorityError
	var badCert x509.CertificateInvalidError
	var badHost x509.HostnameError
	switch {
	case errors.As(err, &we) && we.Code == wire.CodeNotFound:
		return fmt.Errorf("%w: %w", ErrRestorePoint, err)
	case errors.As(err, &we) && we.Code == wire.CodeNoSpace:
		return fmt.Errorf("%w: %w", ErrBackupFull, err)
	case errors.As(err, &we), errors.Is(err, wire.ErrMalformed):
		return fmt.Errorf("%w: %w", ErrBackupProtocol, err)
	case errors.As(err, &alert), errors.As(err, &unknownCA), errors.As(err, &badCert), errors.As(err, &badHost):
		return fmt.Errorf("%w: %w (check [checkpoint] tls: both certificates must come from the same CA, the backup's must name its address)", ErrBackupTLS, err)
	default:
		return fmt.Errorf("%w: %w", ErrBackup, err)
	}
}

func (m *Manager) restore(ctx context.Context, req RestoreRequest, pr probed, t0 time.Time, p *jobs.Progress) (rep RestoreReport, err error) {
	name := req.Name
	op := fmt.Sprintf("restore VM %q from %s", name, req.Backup)
	rep = RestoreReport{VM: name, Backup: req.Backup, ID: req.ID, Mode: req.Mode}
	phase := func(n string, start time.Time, bytes int64) {
		rep.Phases = append(rep.Phases, Phase{Name: n, StartMS: ms(start.Sub(t0)), DurationMS: ms(time.Since(start)), Bytes: bytes})
	}

	info, saved, qstate := pr.info, pr.saved, pr.qstate
	files := m.tlsFiles(req.Backup)
	rep.Epoch = info.Epoch
	rep.Phases = append(rep.Phases, Phase{Name: "probe", StartMS: ms(pr.start.Sub(t0)), DurationMS: ms(pr.duration), Bytes: int64(pr.blobLen)})
	var s time.Time

	mr := memserver.Restore{Backup: req.Backup, ID: req.ID, TLS: files, Epoch: info.Epoch, Mode: req.Mode,
		PrefetchRate: req.PrefetchRate, DeferPrefetch: req.Mode == "lazy"}
	// dom is the domain the VM runs in, and names its memory server.
	// owned: the memory server of dom is this restore's; defined: so is
	// the VM's record and domain. A failure removes what is this
	// restore's, never what a concurrent request made under the name.
	dom, owned, defined, resumed := name, false, false, false
	defer func() {
		// Once resumed the VM is running like any other: a job that
		// fails after that (hostd stopping, refused pages) leaves it to
		// run.
		if err == nil || !owned || resumed {
			return
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if defined {
			m.vms.DiscardIncoming(cctx, name)
		}
		if rerr := m.mem.Release(cctx, dom); rerr != nil {
			m.log.Warn("stop memory server of a failed restore", "vm", name, "err", rerr)
		} else {
			m.vms.RemoveFiles(dom) // the restore cache is the size of the guest
		}
	}()
	var slot xen.DomainSpec
	if req.Slot == "auto" {
		slot, rep.ColdReason = m.slots.take(saved.Spec)
	} else {
		rep.ColdReason = "cold restore requested"
	}
	if slot.Name != "" {
		// The slot's refill waits for the end of this job: starting a
		// QEMU competes for the CPUs with the restored guest.
		defer m.slots.refill(saved.Spec)
		p.Set(0.1, "claim")
		s = time.Now()
		if rep.ColdReason = m.claim(ctx, slot, mr); rep.ColdReason == "" {
			if _, err = m.vms.ClaimSlot(ctx, name, slot); err != nil {
				m.slots.remove(ctx, slot.Name)
				return rep, fmt.Errorf("%s: %w", op, err)
			}
			dom, owned, defined = slot.Name, true, true
			rep.Slot = slot.Name
			phase("claim", s, 0)
		}
	}
	if rep.Slot == "" {
		// Cold: the memory server (lazy: it serves pages from the
		// backup at once; full: it copies every page before it answers),
		// then a QEMU of our own.
		p.Set(0.1, "memory")
		s = time.Now()
		var ramPath string
		if ramPath, err = m.mem.serve(ctx, memserver.Config{VM: name, Size: info.ImageSize, Restore: &mr}); err != nil {
			// A memory server that died starting (a full copy met a
			// refused page) leaves its cache file, as large as the
			// guest's data: remove it unless a memory server runs for
			// the name after all.
			if _, cerr := m.mem.Client(ctx, name); cerr != nil {
				m.vms.RemoveFiles(name)
			}
			return rep, fmt.Errorf("%s: %w", op, err)
		}
		owned = true
		phase("memory", s, 0)
		p.Set(0.4, "define")
		s = time.Now()
		if _, err = m.vms.CreateIncoming(ctx, saved.Spec, name, ramPath); err != nil {
			return rep, fmt.Errorf("%s: %w", op, err)
		}
		defined = true
		phase("define", s, 0)
	}
	c, err := m.mem.Client(ctx, dom)
	if err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}

	p.Set(0.5, "load")
	s = time.Now()
	if err = m.loadDeviceState(ctx, dom, qstate); err != nil {
		return rep, fmt.Errorf("%s: %w", op, err)
	}
	phase("load", s, int64(len(qstate)))
	s = time.Now()
	if err = m.hv.Resume(ctx, dom); err != nil {
		return rep, fmt.Errorf("%s: resume: %w", op, err)
	}
	resumed = true
	phase("resume", s, 0)
	rep.ResumeMS = ms(time.Since(t0))
	slotKind := "cold"
	if rep.Slot != "" {
		slotKind = "warm"
	}
	m.hist.resume.WithLabelValues(slotKind).Observe(rep.ResumeMS / 1000)
	// The prefetch starts now, not with the memory server: before the
	// resume it would compete with QEMU's start and the state load for
	// the CPUs, and the guest's own faults say best what it needs first.
	if req.Mode == "lazy" {
		if err = c.StartPrefetch(ctx); err != nil {
			return rep, fmt.Errorf("%s: start prefetch: %w", op, err)
		}
	}
	m.vms.Resumed(ctx, name)
	m.ev.Publish(events.Event{Type: "vm.restored", VM: name, Data: map[string]any{"backup": req.Backup, "id": req.ID, "epoch": info.Epoch, "mode": req.Mode, "resume_ms": rep.ResumeMS, "slot": rep.Slot}})
	m.log.Info("vm restored", "vm", name, "epoch", info.Epoch, "mode", req.Mode, "resume_ms", rep.ResumeMS, "slot", rep.Slot, "cold_reason", rep.ColdReason)

	if req.Protect != nil {
		pr := *req.Protect
		if pr.Backup == "" {
			pr.Backup, pr.ID = req.Backup, req.ID
		}
		j, perr := m.Protect(ctx, name, pr)
		if perr != nil {
			m.log.Warn("protect the restored VM", "vm", name, "err", perr)
		} else {
			rep.ProtectJob = j.ID
		}
	}

	// Until every page is local, the VM depends on the backup: follow the
	// restore, passing its events on.
	p.Set(0.6, "prefetch")
	s = time.Now()
	var seen int64
	firstRefused := int64(-1)
	for {
		st, serr := c.Status(ctx)
		if serr != nil {
			return rep, fmt.Errorf("%s: after the resume: %w", op, serr)
		}
		if st.RestoreEventSeq > seen {
			fresh := min(int(st.RestoreEventSeq-seen), len(st.RestoreEvents))
			for _, e := range st.RestoreEvents[len(st.RestoreEvents)-fresh:] {
				m.ev.Publish(events.Event{Type: e.Type, VM: name, Data: e})
				if (e.Type == restore.EventCorrupt || e.Type == restore.EventMoved) && firstRefused < 0 {
					firstRefused = e.Page
				}
			}
			seen = st.RestoreEventSeq
		}
		// Every page is local but those the restore refused (their copy
		// at the backup fails its checksum, or is newer than the restore
		// point): the prefetcher has stopped and residency never comes.
		if r := st.Restore; r != nil && r.CorruptPages > 0 && r.PresentBytes+r.CorruptPages*wire.PageSize >= r.TotalBytes {
			return rep, fmt.Errorf("%s: %w: %w: %d pages of restore point %d were refused, corrupt or overwritten at the backup (first: page %d; see the restore.corrupt_page and restore.page_moved events); "+
				"they were never handed to the guest, every other page is local; the VM runs on but a read of a refused page fails and stops it: "+
				"delete it and restore again once the backup's copy is repaired", op, ErrBackupCorrupt, restore.ErrCorrupt, r.CorruptPages, info.Epoch, firstRefused)
		}
		if st.ResidentTotal > 0 {
			p.Set(0.6+0.4*float64(st.Resident)/float64(st.ResidentTotal), "prefetch")
		}
		if st.Restore != nil {
			rep.BytesFetched, rep.Faults = st.Restore.FetchedBytes, st.Restore.RemoteFaults
			rep.FaultP50US, rep.FaultP99US = float64(st.Restore.FaultP50.Microseconds()), float64(st.Restore.FaultP99.Microseconds())
		}
		if st.FullyResident {
			break
		}
		select {
		case <-ctx.Done():
			return rep, fmt.Errorf("%s: waiting for residency: %w", op, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	phase("resident", s, rep.BytesFetched)
	rep.ResidentMS = ms(time.Since(t0))
	m.ev.Publish(events.Event{Type: "vm.resident", VM: name, Data: map[string]any{"resident_ms": rep.ResidentMS, "bytes": rep.BytesFetched}})
	return rep, nil
}

// claim switches a warm slot's memory server to the restore point; ""
// if it did, else why the restore goes cold (the slot is removed then: a
// refused claim leaves it unusable).
func (m *Manager) claim(ctx context.Context, slot xen.DomainSpec, mr memserver.Restore) string {
	c, err := m.mem.Client(ctx, slot.Name)
	if err == nil {
		err = c.Claim(ctx, mr)
	}
	if err == nil {
		return ""
	}
	m.log.Warn("warm slot refused; restoring cold", "slot", slot.Name, "err", err)
	m.slots.remove(ctx, slot.Name)
	return "claiming warm slot " + slot.Name + " failed: " + err.Error()
}

// loadDeviceState feeds QEMU (waiting in inmigrate) the saved state.
func (m *Manager) loadDeviceState(ctx context.Context, name string, state []byte) error {
	q, f, err := m.migration(ctx, "load device state", name)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(state); err != nil {
		return fmt.Errorf("load device state: %w", err)
	}
	if _, err := f.Seek(0, 0); err != nil {
		return fmt.Errorf("load device state: %w", err)
	}
	return q.LoadDeviceState(ctx, name, f)
}
