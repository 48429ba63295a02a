// Package xentest provides an in-memory xen.Hypervisor for unit tests of the
// logic around the hypervisor (request validation, error mapping, record
// keeping). It boots nothing: tests of real behaviour use xen/libvirt.
package xentest

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"hostd/xen"
)

// Fake is an in-memory hypervisor. Set Down to make every call fail with
// xen.ErrUnavailable, as a stopped libvirtd does.
type Fake struct {
	mu   sync.Mutex
	doms map[string]*xen.DomainInfo
	Down bool
	// Calls counts operations by name, for assertions on side effects.
	Calls map[string]int
}

// New returns an empty fake.
func New() *Fake {
	return &Fake{doms: make(map[string]*xen.DomainInfo), Calls: make(map[string]int)}
}

func (f *Fake) enter(op string) error {
	f.Calls[op]++
	if f.Down {
		return fmt.Errorf("%s: %w", op, xen.ErrUnavailable)
	}
	return nil
}

func (f *Fake) get(op, name string) (*xen.DomainInfo, error) {
	d, ok := f.doms[name]
	if !ok {
		return nil, fmt.Errorf("%s %q: %w", op, name, xen.ErrNotFound)
	}
	return d, nil
}

// SetDown switches the simulated outage.
func (f *Fake) SetDown(down bool) { f.mu.Lock(); f.Down = down; f.mu.Unlock() }

func (f *Fake) Host(ctx context.Context) (xen.HostInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("host"); err != nil {
		return xen.HostInfo{}, err
	}
	return xen.HostInfo{Driver: "fake", Accel: xen.AccelTCG, CPUs: 2, MemoryMiB: 4096}, nil
}

func (f *Fake) Define(ctx context.Context, s xen.DomainSpec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("define"); err != nil {
		return err
	}
	if _, ok := f.doms[s.Name]; ok {
		return fmt.Errorf("define %q: %w", s.Name, xen.ErrExists)
	}
	spec := s
	f.doms[s.Name] = &xen.DomainInfo{Name: s.Name, UUID: fmt.Sprintf("uuid-%s", s.Name), State: xen.StateShutoff,
		VCPUs: s.VCPUs, MemoryMiB: s.MemoryMiB, Persistent: true, Spec: &spec}
	return nil
}

func (f *Fake) setState(op, name string, from []xen.State, to xen.State) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter(op); err != nil {
		return err
	}
	d, err := f.get(op, name)
	if err != nil {
		return err
	}
	for _, s := range from {
		if d.State == s {
			d.State = to
			return nil
		}
	}
	return fmt.Errorf("%s %q in state %s: %w", op, name, d.State, xen.ErrState)
}

func (f *Fake) Start(ctx context.Context, name string) error {
	return f.setState("start", name, []xen.State{xen.StateShutoff}, xen.StateRunning)
}
func (f *Fake) Shutdown(ctx context.Context, name string, _ time.Duration) error {
	return f.setState("shutdown", name, []xen.State{xen.StateRunning}, xen.StateShutoff)
}
func (f *Fake) Destroy(ctx context.Context, name string) error {
	return f.setState("destroy", name, []xen.State{xen.StateRunning, xen.StatePaused, xen.StateShutoff}, xen.StateShutoff)
}
func (f *Fake) Suspend(ctx context.Context, name string) error {
	return f.setState("suspend", name, []xen.State{xen.StateRunning}, xen.StatePaused)
}
func (f *Fake) Resume(ctx context.Context, name string) error {
	return f.setState("resume", name, []xen.State{xen.StatePaused}, xen.StateRunning)
}

func (f *Fake) ClearIncoming(ctx context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("clear incoming"); err != nil {
		return err
	}
	d, err := f.get("clear incoming", name)
	if err != nil {
		return err
	}
	if d.Spec != nil {
		s := *d.Spec
		s.Incoming = false
		d.Spec = &s
	}
	return nil
}

func (f *Fake) Undefine(ctx context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("undefine"); err != nil {
		return err
	}
	d, err := f.get("undefine", name)
	if err != nil {
		return err
	}
	if d.State != xen.StateShutoff {
		return fmt.Errorf("undefine %q: %w", name, xen.ErrState)
	}
	delete(f.doms, name)
	return nil
}

func (f *Fake) Domain(ctx context.Context, name string) (xen.DomainInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("domain"); err != nil {
		return xen.DomainInfo{}, err
	}
	d, err := f.get("domain", name)
	if err != nil {
		return xen.DomainInfo{}, err
	}
	return *d, nil
}

func (f *Fake) List(ctx context.Context) ([]xen.DomainInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("list"); err != nil {
		return nil, err
	}
	out := make([]xen.DomainInfo, 0, len(f.doms))
	for _, d := range f.doms {
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (f *Fake) Stats(ctx context.Context, name string) (xen.DomainStats, error) {
	d, err := f.Domain(ctx, name)
	if err != nil {
		return xen.DomainStats{}, err
	}
	if d.State != xen.StateRunning {
		return xen.DomainStats{}, fmt.Errorf("stats %q: %w", name, xen.ErrState)
	}
	return xen.DomainStats{MemoryMiB: d.MemoryMiB, BalloonMiB: d.MemoryMiB}, nil
}

func (f *Fake) SetMemory(ctx context.Context, name string, mib uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("setmemory"); err != nil {
		return err
	}
	_, err := f.get("setmemory", name)
	return err
}

func (f *Fake) AttachDisk(ctx context.Context, name string, disk xen.Disk) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("attachdisk"); err != nil {
		return err
	}
	_, err := f.get("attachdisk", name)
	return err
}

func (f *Fake) DetachDisk(ctx context.Context, name, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("detachdisk"); err != nil {
		return err
	}
	_, err := f.get("detachdisk", name)
	return err
}

// Events returns a channel that stays open and silent until ctx ends.
func (f *Fake) Events(ctx context.Context) (<-chan xen.LifecycleEvent, error) {
	ch := make(chan xen.LifecycleEvent)
	go func() { <-ctx.Done(); close(ch) }()
	return ch, nil
}

func (f *Fake) Monitor() xen.Monitor { return nil }
func (f *Fake) Close() error         { return nil }

var _ xen.Hypervisor = (*Fake)(nil)
