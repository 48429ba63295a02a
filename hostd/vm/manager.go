package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"hostd/hostd/config"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/store"
	"hostd/hostd/valid"
	"hostd/images/guest/agentclient"
	"hostd/xen"
)

// Manager owns the host's VMs.
type Manager struct {
	cfg  config.Config
	hv   xen.Hypervisor
	st   *store.Store
	ev   *events.Broker
	jobs *jobs.Manager
	log  *slog.Logger
	// ctx is the daemon's lifetime: background work (readiness watchers)
	// outlives the API request that started it.
	ctx context.Context

	// mu serialises changes to records so that two requests for the same
	// name cannot both create it, and a watcher cannot overwrite a delete.
	mu       sync.Mutex
	watchers map[string]context.CancelFunc
	// reserved names are being restored: no create may take them while
	// the restore that holds one has files, a memory server or a domain
	// under it that its failure would remove.
	reserved map[string]bool
	wg       sync.WaitGroup
	// nicMTU is given to NICs that ask for none: the connectors' inner MTU,
	// so a guest's eth0 fits the VXLAN link (0: the hypervisor's default).
	nicMTU int
	// mem serves the RAM of VMs created with ServedMemory (nil: refused).
	mem Memory
}

// Memory serves guest RAM files: the seam between VM lifecycle and the
// memory plane (package protect implements it with memory servers).
type Memory interface {
	// Serve makes sure a memory server serves the VM's RAM file of size
	// bytes and returns the path QEMU maps. It is idempotent.
	Serve(ctx context.Context, domain string, size int64) (ramPath string, err error)
	// Release stops serving VM name's memory (served under its domain's
	// name); only once no QEMU maps the file any more.
	Release(ctx context.Context, name, domain string) error
}

// SetNICMTU sets the MTU of new VMs' NICs that request none.
func (m *Manager) SetNICMTU(mtu int) { m.nicMTU = mtu }

// SetMemory lets VMs be created with served memory.
func (m *Manager) SetMemory(mem Memory) { m.mem = mem }

// NewManager returns a manager; call Reconcile before serving requests.
func NewManager(ctx context.Context, cfg config.Config, hv xen.Hypervisor, st *store.Store, ev *events.Broker, jm *jobs.Manager, log *slog.Logger) *Manager {
	return &Manager{cfg: cfg, hv: hv, st: st, ev: ev, jobs: jm, log: log, ctx: ctx, watchers: make(map[string]context.CancelFunc),
		reserved: make(map[string]bool)}
}

// Create validates req, defines and (unless req.Start is false) starts the
// domain. On any failure nothing is left behind: no domain, no files, no record.
func (m *Manager) Create(ctx context.Context, req Request) (VM, error) {
	m.applyDefaults(&req)
	host, err := m.hv.Host(ctx)
	if err != nil {
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}
	if err := req.validate(host.CPUs, host.MemoryMiB); err != nil {
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.nameFree(ctx, req.Name); err != nil {
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}

	spec, err := m.spec(req)
	if err != nil {
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}
	// The driver's own checks (disks, NICs, ...) before any directory,
	// memory server or domain exists, where the driver can make them.
	if c, ok := m.hv.(xen.SpecChecker); ok {
		if err := c.CheckSpec(spec); err != nil {
			return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
		}
	}
	if err := m.makeVMDirs(spec); err != nil {
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}
	if req.ServedMemory {
		if m.mem == nil {
			return VM{}, fmt.Errorf("create VM %q: %w: served memory is not available on this host", req.Name, ErrInvalid)
		}
		p, err := m.mem.Serve(ctx, spec.Name, int64(spec.MemoryMiB)<<20)
		if err != nil {
			m.removeVMFiles(spec)
			return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
		}
		spec.RAMPath = p
	}
	undo := func() {
		cctx, cancel := m.removeDomain(ctx, spec.Name, "failed create")
		defer cancel()
		m.releaseMemory(cctx, spec.Name, spec.Name, req.ServedMemory)
		m.removeVMFiles(spec)
	}
	if err := m.hv.Define(ctx, spec); err != nil {
		undo()
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}
	info, err := m.hv.Domain(ctx, spec.Name)
	if err != nil {
		undo()
		return VM{}, fmt.Errorf("create VM %q: read back: %w", req.Name, err)
	}
	rec := Record{Name: spec.Name, UUID: info.UUID, Spec: spec, Created: time.Now().UTC(), ServedMemory: req.ServedMemory}
	if err := store.Put(m.st, store.BucketVMs, rec.Name, rec); err != nil {
		undo()
		return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
	}
	m.ev.Publish(events.Event{Type: "vm.created", VM: rec.Name, Data: map[string]any{"uuid": rec.UUID}})
	m.log.Info("vm created", "vm", rec.Name, "uuid", rec.UUID, "memory_mib", spec.MemoryMiB, "vcpus", spec.VCPUs)

	if req.Start == nil || *req.Start {
		if err := m.startLocked(ctx, &rec); err != nil {
			undo()
			_ = m.st.Delete(store.BucketVMs, rec.Name)
			m.ev.Publish(events.Event{Type: "vm.deleted", VM: rec.Name, Data: map[string]string{"reason": "start failed"}})
			return VM{}, fmt.Errorf("create VM %q: %w", req.Name, err)
		}
	}
	return m.join(ctx, rec)
}

// Reserve claims name for a restore until release is called: neither a
// create nor another restore can take it meanwhile. It fails if a VM or
// another reservation has the name.
func (m *Manager) Reserve(ctx context.Context, name string) (release func(), err error) {
	if err := valid.VMName(name); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.nameFree(ctx, name); err != nil {
		return nil, err
	}
	m.reserved[name] = true
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.reserved, name)
	}, nil
}

// nameFree checks, with mu held, that no VM, restore or hypervisor domain
// has the name: what a create and a restore's reservation both need.
func (m *Manager) nameFree(ctx context.Context, name string) error {
	if _, err := m.record(name); err == nil {
		return fmt.Errorf("%w (delete it first or choose another name)", ErrExists)
	}
	if m.reserved[name] {
		return fmt.Errorf("%w: a restore to that name is running (GET /v1/jobs)", ErrExists)
	}
	if _, err := m.hv.Domain(ctx, name); err == nil {
		return fmt.Errorf("%w: a domain of that name exists in the hypervisor but not in hostd", ErrExists)
	} else if !errors.Is(err, xen.ErrNotFound) {
		return err
	}
	return nil
}

func (m *Manager) applyDefaults(r *Request) {
	if r.VCPUs == 0 {
		r.VCPUs = 1
	}
	if r.MemoryMiB == 0 {
		r.MemoryMiB = 256
	}
	if r.Kernel == "" {
		r.Kernel, r.Initrd = m.cfg.Guest.Kernel, m.cfg.Guest.Initrd
	}
	if r.Cmdline == "" {
		r.Cmdline = m.cfg.Guest.Cmdline
	}
}

// spec decides where a VM's files live. RAM and serial log sit in the VM's
// state directory; the agent socket in the run directory, whose short path
// keeps unix socket names under their 107-byte limit.
func (m *Manager) spec(r Request) (xen.DomainSpec, error) {
	dir, err := m.cfg.VMDir(r.Name)
	if err != nil {
		return xen.DomainSpec{}, err
	}
	agent, err := m.cfg.RunSocket("agents", r.Name)
	if err != nil {
		return xen.DomainSpec{}, err
	}
	nics := slices.Clone(r.NICs)
	for i := range nics {
		if nics[i].MTU == 0 {
			nics[i].MTU = m.nicMTU
		}
	}
	return xen.DomainSpec{
		Name: r.Name, VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB,
		Kernel: r.Kernel, Initrd: r.Initrd, Cmdline: r.Cmdline,
		Disks: r.Disks, NICs: nics,
		RAMPath:     filepath.Join(dir, "ram"),
		SerialLog:   filepath.Join(dir, "serial.log"),
		AgentSocket: agent,
	}, nil
}

// removeDomain destroys and undefines a domain after a failure (why), with
// a fresh context: the request's may be what failed. It returns that
// context for the rest of the clean-up.
func (m *Manager) removeDomain(ctx context.Context, name, why string) (context.Context, context.CancelFunc) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	if err := m.hv.Destroy(cctx, name); err != nil && !errors.Is(err, xen.ErrNotFound) {
		m.log.Error("clean-up after "+why+": destroy", "vm", name, "err", err)
	}
	if err := m.hv.Undefine(cctx, name); err != nil && !errors.Is(err, xen.ErrNotFound) {
		m.log.Error("clean-up after "+why+": undefine", "vm", name, "err", err)
	}
	return cctx, cancel
}

// releaseMemory stops a VM's memory server once QEMU is gone.
func (m *Manager) releaseMemory(ctx context.Context, name, domain string, served bool) {
	if !served || m.mem == nil {
		return
	}
	if err := m.mem.Release(ctx, name, domain); err != nil {
		m.log.Warn("stop memory server", "vm", name, "err", err)
	}
}

func (m *Manager) makeVMDirs(s xen.DomainSpec) error {
	for _, d := range []string{filepath.Dir(s.RAMPath), filepath.Dir(s.AgentSocket)} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return fmt.Errorf("create VM directory %s: %w", d, err)
		}
	}
	return nil
}

// removeVMFiles removes the VM's directory (RAM or its mount point, serial
// log, a memory server's config, log and restore cache) and agent socket.
// Only paths inside hostd's own directories are removed: a spec read from
// the store names its files, and a record is not trusted to stay in them.
func (m *Manager) removeVMFiles(s xen.DomainSpec) {
	dir, err := m.cfg.VMDir(s.Name)
	if err != nil {
		m.log.Error("remove VM files: not a domain name; nothing removed", "domain", s.Name, "err", err)
		return
	}
	for _, p := range []string{dir, filepath.Dir(s.RAMPath), s.AgentSocket} {
		if p != dir && !m.inOwnDirs(p) {
			m.log.Warn("remove VM files: path outside hostd's directories left alone", "path", p)
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			m.log.Warn("remove VM files", "path", p, "err", err)
		}
	}
}

// Start boots a stopped VM.
func (m *Manager) Start(ctx context.Context, name string) (VM, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, err := m.record(name)
	if err != nil {
		return VM{}, fmt.Errorf("start VM: %w", err)
	}
	if err := m.startLocked(ctx, &rec); err != nil {
		return VM{}, fmt.Errorf("start VM %q: %w", name, err)
	}
	return m.join(ctx, rec)
}

// startLocked starts the domain and follows its serial log to readiness.
func (m *Manager) startLocked(ctx context.Context, rec *Record) error {
	if rec.ServedMemory {
		// The memory server may have ended with the VM (or the host).
		if m.mem == nil {
			return fmt.Errorf("%w: the VM needs served memory, which this host does not offer", ErrInvalid)
		}
		if _, err := m.mem.Serve(ctx, rec.Domain(), int64(rec.Spec.MemoryMiB)<<20); err != nil {
			return err
		}
	}
	if rec.Spec.Incoming {
		// Restored, and the redefinition at its resume failed (or an
		// older hostd restored it): a start would wait for a migration
		// forever.
		if err := m.hv.ClearIncoming(ctx, rec.Domain()); err != nil {
			return err
		}
		rec.Spec.Incoming = false
	}
	// Readiness is judged on what the serial log gains after this start:
	// the log is appended across restarts.
	offset := fileSize(rec.Spec.SerialLog)
	started := time.Now().UTC()
	if err := m.hv.Start(ctx, rec.Domain()); err != nil {
		return err
	}
	rec.Started, rec.Ready, rec.BootMS, rec.GuestUptimeMS, rec.Vanished = &started, nil, 0, 0, false
	rec.SerialOffset = offset
	if err := store.Put(m.st, store.BucketVMs, rec.Name, *rec); err != nil {
		return err
	}
	m.watchReady(rec.Name, rec.Spec.SerialLog, offset, started)
	return nil
}

// watchReady follows the serial log in the background until the agent's
// ready line appears, then records the boot time.
func (m *Manager) watchReady(name, logPath string, offset int64, started time.Time) {
	if cancel, ok := m.watchers[name]; ok {
		cancel()
	}
	ctx, cancel := context.WithTimeout(m.ctx, 10*time.Minute)
	m.watchers[name] = cancel
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer cancel()
		// The guest agent prints its ready line on the serial console once it
		// runs; start to that line is the VM's boot time.
		r, err := agentclient.WaitReadyFrom(ctx, logPath, offset)
		if err != nil {
			if ctx.Err() == context.DeadlineExceeded {
				m.log.Warn("guest agent never announced itself", "vm", name, "log", logPath)
			}
			return
		}
		ready := time.Now().UTC()
		m.mu.Lock()
		defer m.mu.Unlock()
		rec, err := m.record(name)
		if err != nil || rec.Started == nil || !rec.Started.Equal(started) {
			return // deleted or restarted meanwhile
		}
		rec.Ready, rec.BootMS = &ready, float64(ready.Sub(started).Microseconds())/1000
		rec.GuestUptimeMS = r.UptimeMS
		if err := store.Put(m.st, store.BucketVMs, name, rec); err != nil {
			m.log.Error("record readiness", "vm", name, "err", err)
			return
		}
		m.log.Info("vm ready", "vm", name, "boot_ms", rec.BootMS, "guest_uptime_ms", r.UptimeMS)
		m.ev.Publish(events.Event{Type: "vm.ready", VM: name, Data: map[string]any{"boot_ms": rec.BootMS, "agent": r.Fields}})
	}()
}

func (m *Manager) stopWatcher(name string) {
	if cancel, ok := m.watchers[name]; ok {
		cancel()
		delete(m.watchers, name)
	}
}

// Destroy powers a VM off at once; its definition and files stay.
func (m *Manager) Destroy(ctx context.Context, name string) (VM, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, err := m.record(name)
	if err != nil {
		return VM{}, fmt.Errorf("destroy VM: %w", err)
	}
	m.stopWatcher(name)
	if err := m.hv.Destroy(ctx, rec.Domain()); err != nil {
		return VM{}, fmt.Errorf("destroy VM %q: %w", name, err)
	}
	return m.join(ctx, rec)
}

// ShutdownReport is the final report of a shutdown job.
type ShutdownReport struct {
	DurationMS float64 `json:"duration_ms"`
}

// Shutdown asks the guest to power off, as a job bounded by timeout (the
// configured default when zero).
func (m *Manager) Shutdown(ctx context.Context, name string, timeout time.Duration) (jobs.Job, error) {
	v, err := m.Get(ctx, name)
	if err != nil {
		return jobs.Job{}, fmt.Errorf("shutdown VM: %w", err)
	}
	if timeout <= 0 {
		timeout = m.cfg.Hypervisor.ShutdownTimeout.Duration
	}
	return m.jobs.Start(m.ctx, "shutdown", name, func(ctx context.Context, p *jobs.Progress) (any, error) {
		p.Set(0, "acpi")
		t0 := time.Now()
		if err := m.hv.Shutdown(ctx, v.Domain(), timeout); err != nil {
			return nil, fmt.Errorf("shutdown VM %q: %w", name, err)
		}
		return ShutdownReport{DurationMS: float64(time.Since(t0).Microseconds()) / 1000}, nil
	})
}

// Delete destroys the VM if it runs, removes its definition, files and record.
func (m *Manager) Delete(ctx context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, err := m.record(name)
	if err != nil {
		return fmt.Errorf("delete VM: %w", err)
	}
	m.stopWatcher(name)
	if err := m.hv.Destroy(ctx, rec.Domain()); err != nil && !errors.Is(err, xen.ErrNotFound) {
		return fmt.Errorf("delete VM %q: %w", name, err)
	}
	if err := m.hv.Undefine(ctx, rec.Domain()); err != nil && !errors.Is(err, xen.ErrNotFound) {
		return fmt.Errorf("delete VM %q: %w", name, err)
	}
	m.releaseMemory(ctx, name, rec.Domain(), rec.ServedMemory)
	m.removeVMFiles(rec.Spec)
	if err := m.st.Delete(store.BucketVMs, name); err != nil {
		return fmt.Errorf("delete VM %q: %w", name, err)
	}
	m.ev.Publish(events.Event{Type: "vm.deleted", VM: name})
	m.log.Info("vm deleted", "vm", name)
	return nil
}

// Get returns one VM with its live state.
func (m *Manager) Get(ctx context.Context, name string) (VM, error) {
	rec, err := m.record(name)
	if err != nil {
		return VM{}, fmt.Errorf("get VM: %w", err)
	}
	return m.join(ctx, rec)
}

// List returns all of hostd's VMs with live state: one store scan and one
// hypervisor listing, whatever the number of VMs.
func (m *Manager) List(ctx context.Context) ([]VM, error) {
	recs, err := store.List[Record](m.st, store.BucketVMs)
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	doms, err := m.hv.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	live := make(map[string]xen.DomainInfo, len(doms))
	for _, d := range doms {
		live[d.Name] = d
	}
	out := make([]VM, 0, len(recs))
	for _, r := range recs {
		v := VM{Record: r, State: xen.StateUnknown}
		if d, ok := live[r.Domain()]; ok {
			v.State, v.Reason = d.State, d.Reason
		} else {
			v.Vanished = true
		}
		out = append(out, v)
	}
	return out, nil
}

// Stats samples a running VM's counters.
func (m *Manager) Stats(ctx context.Context, name string) (xen.DomainStats, error) {
	rec, err := m.record(name)
	if err != nil {
		return xen.DomainStats{}, fmt.Errorf("VM stats: %w", err)
	}
	s, err := m.hv.Stats(ctx, rec.Domain())
	if err != nil {
		return xen.DomainStats{}, fmt.Errorf("VM %q stats: %w", name, err)
	}
	return s, nil
}

// NICDevice returns the host tap of a VM's NIC (an index into its NICs).
func (m *Manager) NICDevice(name string, nic int) (string, error) {
	rec, err := m.record(name)
	if err != nil {
		return "", err
	}
	if nic < 0 || nic >= len(rec.Spec.NICs) {
		return "", fmt.Errorf("VM %q has no NIC %d (it has %d)", name, nic, len(rec.Spec.NICs))
	}
	return rec.Spec.NICs[nic].Tap, nil
}

// Console returns the last n lines of the VM's serial console.
func (m *Manager) Console(name string, n int) ([]byte, error) {
	rec, err := m.record(name)
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	out, err := TailLines(rec.Spec.SerialLog, n)
	if err != nil {
		return nil, fmt.Errorf("console of VM %q: %w", name, err)
	}
	return out, nil
}

func (m *Manager) record(name string) (Record, error) {
	rec, err := store.Get[Record](m.st, store.BucketVMs, name)
	if errors.Is(err, store.ErrNotFound) {
		return Record{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return rec, err
}

// DomainOf returns the domain of VM name (see Record.Domain); name itself
// if there is no such VM.
func (m *Manager) DomainOf(name string) string {
	rec, err := m.record(name)
	if err != nil {
		return name
	}
	return rec.Domain()
}

func (m *Manager) join(ctx context.Context, rec Record) (VM, error) {
	d, err := m.hv.Domain(ctx, rec.Domain())
	switch {
	case errors.Is(err, xen.ErrNotFound):
		rec.Vanished = true
		return VM{Record: rec, State: xen.StateUnknown}, nil
	case err != nil:
		return VM{}, fmt.Errorf("VM %q: %w", rec.Name, err)
	}
	return VM{Record: rec, State: d.State, Reason: d.Reason}, nil
}

// Wait returns when background watchers have ended (after the daemon's
// context is cancelled).
func (m *Manager) Wait() { m.wg.Wait() }

func fileSize(p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return st.Size()
}

// MemoryRequest is the body of PUT /v1/vms/{name}/memory.
type MemoryRequest struct {
	// TargetMiB is the balloon target: what the guest may keep of its
	// memory_mib. Below what the guest uses, it pages out (to its swap, if
	// it has one).
	TargetMiB uint64 `json:"target_mib"`
}

// SetBalloon sets a running VM's balloon target. The guest gives memory
// back at its own pace; Stats shows the effect.
func (m *Manager) SetBalloon(ctx context.Context, name string, req MemoryRequest) (xen.DomainStats, error) {
	rec, err := m.record(name)
	if err != nil {
		return xen.DomainStats{}, fmt.Errorf("set VM memory: %w", err)
	}
	if req.TargetMiB < MinMemoryMiB || req.TargetMiB > rec.Spec.MemoryMiB {
		return xen.DomainStats{}, fmt.Errorf("set VM %q memory: %w: target_mib %d must be %d..%d (the VM's memory_mib)",
			name, ErrInvalid, req.TargetMiB, MinMemoryMiB, rec.Spec.MemoryMiB)
	}
	if err := m.hv.SetMemory(ctx, rec.Domain(), req.TargetMiB); err != nil {
		return xen.DomainStats{}, fmt.Errorf("set VM %q memory: %w", name, err)
	}
	m.ev.Publish(events.Event{Type: "vm.memory", VM: name, Data: map[string]uint64{"target_mib": req.TargetMiB}})
	m.log.Info("vm balloon target set", "vm", name, "target_mib", req.TargetMiB)
	return m.Stats(ctx, name)
}
