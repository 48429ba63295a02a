package swap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/pki"
	"hostd/dataplane/nbd"
	"hostd/dataplane/overload"
	"hostd/dataplane/swapdev"
	"hostd/hostd/config"
	"hostd/hostd/errdefs"
	"hostd/hostd/events"
	"hostd/hostd/store"
	"hostd/hostd/valid"
	"hostd/hostd/vm"
	"hostd/xen"
)

// SerialNumber is the virtio serial of every swap disk: the guest looks
// for it (agent swapon {"serial": "hostd-swap"}).
const SerialNumber = "hostd-swap"

// Target is the libvirt target name of the swap disk when it is plugged
// through the hypervisor; VMs' own disks are named from vda up.
const Target = "vdz"

// Errors the API maps to status codes.
var (
	ErrInvalid       = errdefs.New(errdefs.ErrInvalid, "invalid_request", "invalid swap request")
	ErrExists        = errdefs.New(errdefs.ErrConflict, "exists", "the VM already has a swap device")
	ErrNoSwap        = errdefs.New(errdefs.ErrNotFound, "no_swap", "the VM has no swap device")
	ErrNotConfigured = errdefs.New(errdefs.ErrNotImplemented, "not_configured", "cooperative swap is not configured on this host")
	ErrState         = errdefs.New(errdefs.ErrConflict, "invalid_state", "the VM is not running")
	// ErrProtected: the VM is protected; an evacuation would not carry
	// the pages it swapped out.
	ErrProtected = errdefs.New(errdefs.ErrConflict, "swap_and_protection", "the VM is protected")
)

// Request is the body of PUT /v1/vms/{name}/swap.
type Request struct {
	// SizeMiB is the device's size (the guest's swap space).
	SizeMiB int64 `json:"size_mib"`
	// Repos are the page repositories (repo-role hosts), host:port.
	Repos []string `json:"repos"`
}

// Record is what the store keeps per device, so a restarted hostd can
// serve it again.
type Record struct {
	VM      string   `json:"vm"`
	SizeMiB int64    `json:"size_mib"`
	Repos   []string `json:"repos"`
	Path    string   `json:"path"`   // local write-through file
	Socket  string   `json:"socket"` // NBD unix socket QEMU connects to
	Serial  string   `json:"serial"`
	// Plugged says how the disk was hot-plugged: "monitor" (QEMU's
	// blockdev-add and device_add, with the NBD reconnect delay) or
	// "hypervisor" (xen.Hypervisor.AttachDisk, target vdz).
	Plugged string    `json:"plugged"`
	Created time.Time `json:"created"`
}

// Status is the body of GET /v1/vms/{name}/swap.
type Status struct {
	Record
	Stats    swapdev.Stats  `json:"stats"`
	Overload OverloadStatus `json:"overload"`
}

// OverloadStatus is a VM's overload policy state.
type OverloadStatus struct {
	Overloaded bool `json:"overloaded"`
	// ThresholdS is the migration threshold in force, in seconds.
	ThresholdS float64 `json:"threshold_s"`
	// Transients counts the transient overloads it learned from.
	Transients int `json:"transients"`
	// Rate is the last interval's paging operations (4 KiB pages read or
	// written) per second.
	Rate float64 `json:"rate"`
	// Last is the last event, if any.
	Last *overload.Event `json:"last_event,omitempty"`
}

// VMs is what the manager needs of the VM manager.
type VMs interface {
	Get(ctx context.Context, name string) (vm.VM, error)
	// DomainOf is the hypervisor's name for the VM: its own, or a warm
	// slot's for a VM restored into one.
	DomainOf(name string) string
}

// Manager owns the swap devices.
type Manager struct {
	cfg config.Config
	hv  xen.Hypervisor
	vms VMs
	st  *store.Store
	ev  *events.Broker
	log *slog.Logger
	// ctx is the daemon's lifetime: devices and samplers outlive requests.
	ctx context.Context

	mu   sync.Mutex // guards devs; held across a Put or Delete
	devs map[string]*device
	wg   sync.WaitGroup
}

type device struct {
	ctx    context.Context // ends when the device stops
	rec    Record
	dev    *swapdev.Device
	stop   context.CancelFunc
	served chan struct{} // closed when the NBD server has returned

	mu       sync.Mutex // guards pol, lastRate, last
	pol      *overload.Policy
	lastRate float64
	last     *overload.Event
	sampled  chan struct{} // closed when the sampler has returned
}

// NewManager makes a manager; call Resume at start.
func NewManager(ctx context.Context, cfg config.Config, hv xen.Hypervisor, vms VMs, st *store.Store, ev *events.Broker, log *slog.Logger) *Manager {
	return &Manager{cfg: cfg, hv: hv, vms: vms, st: st, ev: ev, log: log.With("component", "swap"), ctx: ctx, devs: map[string]*device{}}
}

func (r Request) validate(maxMiB int64) error {
	switch {
	case r.SizeMiB <= 0:
		return fmt.Errorf("%w: size_mib must be at least 1", ErrInvalid)
	case r.SizeMiB > maxMiB:
		return fmt.Errorf("%w: size_mib %d exceeds this host's limit of %d (swap.max_size_mib)", ErrInvalid, r.SizeMiB, maxMiB)
	case len(r.Repos) == 0:
		return fmt.Errorf("%w: repos is empty: name at least one page repository (host:port of a repo-role hostd)", ErrInvalid)
	case len(r.Repos) > 16:
		return fmt.Errorf("%w: %d repos; at most 16", ErrInvalid, len(r.Repos))
	}
	seen := map[string]bool{}
	for _, a := range r.Repos {
		if err := valid.HostPort("repo", a); err != nil {
			return err
		}
		if seen[a] {
			return fmt.Errorf("%w: repo %q named twice", ErrInvalid, a)
		}
		seen[a] = true
	}
	return nil
}

// repoConfigs makes the TLS client configuration of each repository (the
// server name is the address's host, as in the repository's certificate).
func (m *Manager) repoConfigs(addrs []string) ([]swapdev.RepoConfig, error) {
	t := m.cfg.Swap.TLS
	if !t.Set() {
		return nil, fmt.Errorf("%w: set [swap] tls (ca, cert, key) in the configuration", ErrNotConfigured)
	}
	var out []swapdev.RepoConfig
	for _, a := range addrs {
		host, _, _ := net.SplitHostPort(a)
		tc, err := pki.ClientConfig(t.CA, t.Cert, t.Key, host)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNotConfigured, err)
		}
		out = append(out, swapdev.RepoConfig{Addr: a, TLS: tc})
	}
	return out, nil
}

// Put makes a VM's swap device and plugs it into the running VM.
func (m *Manager) Put(ctx context.Context, name string, req Request) (Status, error) {
	op := fmt.Sprintf("swap for VM %q", name)
	if err := valid.VMName(name); err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := req.validate(m.cfg.Swap.MaxSizeMiB); err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	v, err := m.vms.Get(ctx, name)
	if err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	if v.State != xen.StateRunning {
		return Status{}, fmt.Errorf("%s: %w (state %s): start it, then add swap", op, ErrState, v.State)
	}
	if m.st.Has(store.BucketProtection, name) {
		return Status{}, fmt.Errorf("%s: %w: pages swapped out to the device would not move with an evacuation; DELETE /v1/vms/%s/protection first", op, ErrProtected, name)
	}
	for _, dk := range v.Spec.Disks {
		if dk.Target == Target {
			return Status{}, fmt.Errorf("%s: %w: the VM's own disk uses target %s", op, ErrInvalid, Target)
		}
	}
	repos, err := m.repoConfigs(req.Repos)
	if err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.devs[name]; ok {
		return Status{}, fmt.Errorf("%s: %w (DELETE it first to change it)", op, ErrExists)
	}
	dir, err := m.cfg.VMDir(v.Domain())
	if err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	sock, err := m.cfg.RunSocket("swap", name)
	if err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	rec := Record{
		VM: name, SizeMiB: req.SizeMiB, Repos: slices.Clone(req.Repos),
		Path: filepath.Join(dir, "swap.img"), Socket: sock,
		Serial: SerialNumber, Created: time.Now().UTC(),
	}
	if len(rec.Socket) > 107 {
		return Status{}, fmt.Errorf("%s: %w: socket path %s is longer than 107 bytes (shorten run_dir or the VM name)", op, ErrInvalid, rec.Socket)
	}
	if err := checkSpace(filepath.Dir(rec.Path), req.SizeMiB<<20); err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	d, err := m.open(rec, repos, false)
	if err != nil {
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	how, err := m.plug(ctx, rec)
	if err != nil {
		m.close(d, true)
		return Status{}, fmt.Errorf("%s: plug the disk: %w", op, err)
	}
	rec.Plugged = how
	d.rec.Plugged = how
	if err := store.Put(m.st, store.BucketSwap, name, rec); err != nil {
		if uerr := m.detach(rec); uerr != nil {
			m.log.Warn("unplug after a failed store", "vm", name, "err", uerr)
		}
		m.close(d, true)
		return Status{}, fmt.Errorf("%s: %w", op, err)
	}
	m.devs[name] = d
	m.start(d)
	m.ev.Publish(events.Event{Type: "swap.created", VM: name, Data: map[string]any{"size_mib": rec.SizeMiB, "repos": rec.Repos}})
	m.log.Info("swap device plugged", "vm", name, "size_mib", rec.SizeMiB, "repos", rec.Repos, "socket", rec.Socket)
	return d.status(), nil
}

// checkSpace refuses a device whose local file could not be written in
// full: the write-through copy is what makes a lost peer harmless.
func checkSpace(dir string, size int64) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	if free := int64(fs.Bavail) * fs.Bsize; free < size {
		return fmt.Errorf("%w: %s has %d MiB free, the device needs %d MiB for its local copy (free space or ask for less)",
			ErrInvalid, dir, free>>20, size>>20)
	}
	return nil
}

// open makes the device and serves it on its socket.
func (m *Manager) open(rec Record, repos []swapdev.RepoConfig, reuse bool) (*device, error) {
	if err := os.MkdirAll(filepath.Dir(rec.Socket), 0o750); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	dev, err := swapdev.Open(m.ctx, swapdev.Config{Path: rec.Path, Size: rec.SizeMiB << 20, Repos: repos, Reuse: reuse, Logger: m.log.With("vm", rec.VM)})
	if err != nil {
		return nil, err
	}
	srv, err := nbd.NewServer(dev, nbd.Options{Logger: m.log.With("vm", rec.VM)})
	if err != nil {
		dev.Close()
		return nil, err
	}
	if err := os.Remove(rec.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		dev.Close()
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", rec.Socket)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("listen on %s: %w", rec.Socket, err)
	}
	ctx, cancel := context.WithCancel(m.ctx)
	d := &device{ctx: ctx, rec: rec, dev: dev, stop: cancel, served: make(chan struct{}), sampled: make(chan struct{}),
		pol: overload.New(overload.Config{RateThreshold: m.cfg.Swap.RateThreshold, InitialThreshold: m.cfg.Swap.InitialThreshold.Duration})}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer close(d.served)
		if err := srv.Serve(ctx, ln); err != nil && ctx.Err() == nil {
			m.log.Error("swap NBD server ended", "vm", rec.VM, "err", err)
		}
	}()
	return d, nil
}

// start runs the device's sampler.
func (m *Manager) start(d *device) {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer close(d.sampled)
		m.sample(d)
	}()
}

// close stops serving and closes the device; remove also deletes its
// files. A started sampler must have returned.
func (m *Manager) close(d *device, remove bool) {
	d.stop()
	<-d.served
	if err := d.dev.Close(); err != nil {
		m.log.Warn("close swap device", "vm", d.rec.VM, "err", err)
	}
	if remove {
		for _, p := range []string{d.rec.Path, d.rec.Socket} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				m.log.Warn("remove swap file", "path", p, "err", err)
			}
		}
	}
}

func (m *Manager) detach(rec Record) error {
	ctx, cancel := context.WithTimeout(m.ctx, 30*time.Second)
	defer cancel()
	return m.unplug(ctx, rec)
}

// Delete unplugs the VM's swap disk and removes the device. The guest
// must have turned the swap off first.
func (m *Manager) Delete(ctx context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.devs[name]
	if !ok {
		return fmt.Errorf("delete swap of VM %q: %w", name, ErrNoSwap)
	}
	if err := m.detach(d.rec); err != nil && !errors.Is(err, xen.ErrNotFound) {
		return fmt.Errorf("delete swap of VM %q: unplug the disk: %w (swapoff in the guest, then retry)", name, err)
	}
	m.remove(name, d, "deleted")
	return nil
}

// remove ends a device whose disk is gone (or whose VM is). Called with mu held.
func (m *Manager) remove(name string, d *device, why string) {
	delete(m.devs, name)
	d.stop()
	<-d.sampled
	m.close(d, true)
	if err := m.st.Delete(store.BucketSwap, name); err != nil {
		m.log.Warn("forget swap record", "vm", name, "err", err)
	}
	m.ev.Publish(events.Event{Type: "swap.deleted", VM: name, Data: map[string]string{"reason": why}})
	m.log.Info("swap device removed", "vm", name, "reason", why)
}

// Get reports a VM's device.
func (m *Manager) Get(name string) (Status, error) {
	m.mu.Lock()
	d, ok := m.devs[name]
	m.mu.Unlock()
	if !ok {
		return Status{}, fmt.Errorf("swap of VM %q: %w (PUT /v1/vms/%s/swap makes one)", name, ErrNoSwap, name)
	}
	return d.status(), nil
}

// List reports every device, by VM name.
func (m *Manager) List() []Status {
	m.mu.Lock()
	ds := make([]*device, 0, len(m.devs))
	for _, d := range m.devs {
		ds = append(ds, d)
	}
	m.mu.Unlock()
	out := make([]Status, 0, len(ds))
	for _, d := range ds {
		out = append(out, d.status())
	}
	slices.SortFunc(out, func(a, b Status) int {
		if a.VM < b.VM {
			return -1
		}
		if a.VM > b.VM {
			return 1
		}
		return 0
	})
	return out
}

func (d *device) status() Status {
	st := Status{Record: d.rec, Stats: d.dev.Stats()}
	d.mu.Lock()
	st.Overload = OverloadStatus{Overloaded: d.pol.Overloaded(), ThresholdS: d.pol.Threshold().Seconds(),
		Transients: d.pol.Transients(), Rate: d.lastRate, Last: d.last}
	d.mu.Unlock()
	return st
}

// Resume serves again the devices of VMs that still run (a restarted
// hostd: QEMU reconnects to the socket) and forgets the others.
func (m *Manager) Resume(ctx context.Context) {
	recs, err := store.List[Record](m.st, store.BucketSwap)
	if err != nil {
		m.log.Error("list swap devices", "err", err)
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, rec := range recs {
		v, err := m.vms.Get(ctx, rec.VM)
		if err != nil || v.State != xen.StateRunning {
			m.log.Info("swap device of a VM that no longer runs: removed", "vm", rec.VM)
			_ = os.Remove(rec.Path)
			_ = os.Remove(rec.Socket)
			_ = m.st.Delete(store.BucketSwap, rec.VM)
			continue
		}
		repos, err := m.repoConfigs(rec.Repos)
		if err == nil {
			var d *device
			if d, err = m.open(rec, repos, true); err == nil {
				m.devs[rec.VM] = d
				m.start(d)
				m.log.Info("swap device served again", "vm", rec.VM)
				continue
			}
		}
		m.log.Error("swap device could not be served again: the guest's swap disk fails until it is re-created", "vm", rec.VM, "err", err)
	}
}

// Watch ends the devices of VMs that stop or are deleted, until ctx ends.
func (m *Manager) Watch(ctx context.Context) {
	for e := range m.ev.Subscribe(ctx, 256) {
		gone := e.Type == "vm.deleted"
		if e.Type == "vm.lifecycle" {
			if data, ok := e.Data.(map[string]string); ok && (data["event"] == xen.EventStopped || data["event"] == xen.EventCrashed) {
				gone = true
			}
		}
		if !gone {
			continue
		}
		m.mu.Lock()
		if d, ok := m.devs[e.VM]; ok {
			m.remove(e.VM, d, "vm "+e.Type)
		}
		m.mu.Unlock()
	}
}

// Close flushes and closes every device at a graceful stop, leaving the
// disks plugged and the records kept for Resume.
func (m *Manager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, d := range m.devs {
		d.stop()
		<-d.sampled
		m.close(d, false)
		delete(m.devs, name)
	}
	m.wg.Wait()
}
