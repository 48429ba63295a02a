package connector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"hostd/dataplane"
	"hostd/hostd/errdefs"
	"hostd/hostd/events"
	"hostd/hostd/store"
	"hostd/hostd/valid"
)

// ErrDisabled: this hostd runs no dataplane (no underlay configured).
var ErrDisabled = errdefs.New(errdefs.ErrNotImplemented, "not_configured", "connectors are not configured on this host: set dataplane.underlay in the configuration")

// Endpoint names one end of a connector as the scheduler sees it.
type Endpoint struct {
	// Host is the underlay address of the host running the VM.
	Host string `json:"host"`
	// VM and NIC (an index into the VM's NICs) name the vNIC. On this
	// host they must exist; on other hosts they are recorded as given.
	VM  string `json:"vm"`
	NIC int    `json:"nic"`
}

// Spec is the body of POST /v1/connectors and PUT /v1/connectors/{id}.
type Spec struct {
	ID uint32   `json:"id"`
	A  Endpoint `json:"a"`
	B  Endpoint `json:"b"`
}

// Record is what the store keeps, and what the API returns.
type Record struct {
	Spec
	// Dataplane is the spec resolved to underlay addresses and local taps.
	Dataplane dataplane.Connector `json:"dataplane"`
	// Collapsed: both endpoints are on this host, linked tap to tap.
	Collapsed bool      `json:"collapsed"`
	MTU       int       `json:"mtu"` // inner MTU of the link
	Created   time.Time `json:"created"`
	Updated   time.Time `json:"updated"`
}

// Limits of a connector spec.
const (
	MaxID  = 1<<24 - 1 // a VXLAN network identifier
	maxNIC = 63
)

// Validate checks what a spec says on its own, on every host: an id a VNI
// can carry, endpoints with IP addresses, VM names and NIC indexes that
// can exist. Whether a local endpoint's VM and NIC exist is checked later.
func (s Spec) Validate() error {
	if s.ID == 0 || s.ID > MaxID {
		return fmt.Errorf("%w: id %d is out of range: it must be from 1 to %d (a VXLAN VNI)", dataplane.ErrInvalid, s.ID, MaxID)
	}
	for _, e := range []struct {
		name string
		in   Endpoint
	}{{"a", s.A}, {"b", s.B}} {
		if _, err := netip.ParseAddr(e.in.Host); err != nil {
			return fmt.Errorf("%w: endpoint %s: host %q is not an IP address: give the underlay address of the host running the VM", dataplane.ErrInvalid, e.name, e.in.Host)
		}
		if e.in.VM != "" {
			if err := valid.VMName(e.in.VM); err != nil {
				return fmt.Errorf("endpoint %s: %w", e.name, err)
			}
		}
		if e.in.NIC < 0 || e.in.NIC > maxNIC {
			return fmt.Errorf("%w: endpoint %s: nic %d must be from 0 to %d", dataplane.ErrInvalid, e.name, e.in.NIC, maxNIC)
		}
	}
	return nil
}

// NICs resolves a VM's NIC to its tap on this host.
type NICs interface {
	NICDevice(vm string, nic int) (string, error)
}

// Manager configures this host's connector endpoints.
type Manager struct {
	dp   dataplane.Dataplane // nil: disabled
	self netip.Addr
	nics NICs
	st   *store.Store
	ev   *events.Broker
	log  *slog.Logger
	// mu serialises changes so the store and the dataplane agree.
	mu sync.Mutex
}

// NewManager returns a manager over dp (nil when connectors are disabled).
func NewManager(dp dataplane.Dataplane, self netip.Addr, nics NICs, st *store.Store, ev *events.Broker, log *slog.Logger) *Manager {
	return &Manager{dp: dp, self: self.Unmap(), nics: nics, st: st, ev: ev, log: log}
}

// Enabled reports whether this host runs a dataplane.
func (m *Manager) Enabled() bool { return m.dp != nil }

// resolve turns a spec into the dataplane's connector: addresses parsed,
// this host's endpoints mapped to their VMs' taps.
func (m *Manager) resolve(s Spec) (dataplane.Connector, error) {
	c := dataplane.Connector{ID: s.ID}
	for _, e := range []struct {
		name string
		in   Endpoint
		out  *dataplane.Endpoint
	}{{"a", s.A, &c.A}, {"b", s.B, &c.B}} {
		host, err := netip.ParseAddr(e.in.Host)
		if err != nil {
			return c, fmt.Errorf("%w: endpoint %s: host %q is not an IP address: give the underlay address of the host running the VM", dataplane.ErrInvalid, e.name, e.in.Host)
		}
		e.out.Host = host.Unmap()
		if e.out.Host != m.self {
			continue
		}
		if e.in.VM == "" {
			return c, fmt.Errorf("%w: endpoint %s is on this host (%s) but names no VM", dataplane.ErrInvalid, e.name, m.self)
		}
		dev, err := m.nics.NICDevice(e.in.VM, e.in.NIC)
		if err != nil {
			return c, fmt.Errorf("%w: endpoint %s: %w", dataplane.ErrInvalid, e.name, err)
		}
		e.out.Device = dev
	}
	return c, nil
}

// Create configures a new connector's endpoints on this host.
func (m *Manager) Create(ctx context.Context, s Spec) (Record, error) {
	if err := s.Validate(); err != nil {
		return Record{}, fmt.Errorf("create connector: %w", err)
	}
	if m.dp == nil {
		return Record{}, fmt.Errorf("create connector: %w", ErrDisabled)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.record(s.ID); err == nil {
		return Record{}, fmt.Errorf("create connector %d: %w (delete it first, or PUT to retarget it)", s.ID, dataplane.ErrExists)
	}
	dc, err := m.resolve(s)
	if err != nil {
		return Record{}, fmt.Errorf("create connector %d: %w", s.ID, err)
	}
	if err := m.dp.Create(ctx, dc); err != nil {
		return Record{}, err
	}
	now := time.Now().UTC()
	rec := m.newRecord(s, dc, now, now)
	if err := store.Put(m.st, store.BucketConnectors, key(s.ID), rec); err != nil {
		_ = m.dp.Delete(context.WithoutCancel(ctx), s.ID)
		return Record{}, fmt.Errorf("create connector %d: %w", s.ID, err)
	}
	m.log.Info("connector created", "id", s.ID, "a", dc.A.String(), "b", dc.B.String(), "collapsed", rec.Collapsed)
	m.ev.Publish(events.Event{Type: "connector.created", Data: rec})
	return rec, nil
}

// Update retargets a connector: typically one endpoint moved to another
// host. Only the dataplane's map entries change.
func (m *Manager) Update(ctx context.Context, s Spec) (Record, error) {
	if err := s.Validate(); err != nil {
		return Record{}, fmt.Errorf("retarget connector: %w", err)
	}
	if m.dp == nil {
		return Record{}, fmt.Errorf("retarget connector: %w", ErrDisabled)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	old, err := m.record(s.ID)
	if err != nil {
		return Record{}, fmt.Errorf("retarget connector: %w", err)
	}
	dc, err := m.resolve(s)
	if err != nil {
		return Record{}, fmt.Errorf("retarget connector %d: %w", s.ID, err)
	}
	t0 := time.Now()
	if err := m.dp.Update(ctx, dc); err != nil {
		return Record{}, err
	}
	took := time.Since(t0)
	rec := m.newRecord(s, dc, old.Created, time.Now().UTC())
	if err := store.Put(m.st, store.BucketConnectors, key(s.ID), rec); err != nil {
		return Record{}, fmt.Errorf("retarget connector %d: %w", s.ID, err)
	}
	m.log.Info("connector retargeted", "id", s.ID, "a", dc.A.String(), "b", dc.B.String(), "took", took)
	m.ev.Publish(events.Event{Type: "connector.retargeted", Data: map[string]any{
		"connector": rec, "from": old.Dataplane, "took_ms": float64(took.Microseconds()) / 1000}})
	return rec, nil
}

// Delete removes this host's endpoints of a connector.
func (m *Manager) Delete(ctx context.Context, id uint32) error {
	if m.dp == nil {
		return fmt.Errorf("delete connector: %w", ErrDisabled)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.record(id); err != nil {
		return fmt.Errorf("delete connector: %w", err)
	}
	if err := m.dp.Delete(ctx, id); err != nil && !errors.Is(err, dataplane.ErrNotFound) {
		return err
	}
	if err := m.st.Delete(store.BucketConnectors, key(id)); err != nil {
		return fmt.Errorf("delete connector %d: %w", id, err)
	}
	m.log.Info("connector deleted", "id", id)
	m.ev.Publish(events.Event{Type: "connector.deleted", Data: map[string]uint32{"id": id}})
	return nil
}

// Get returns one connector.
func (m *Manager) Get(id uint32) (Record, error) {
	if m.dp == nil {
		return Record{}, fmt.Errorf("get connector: %w", ErrDisabled)
	}
	rec, err := m.record(id)
	if err != nil {
		return Record{}, fmt.Errorf("get connector: %w", err)
	}
	return rec, nil
}

// List returns all connectors with endpoints on this host.
func (m *Manager) List() ([]Record, error) {
	if m.dp == nil {
		return nil, fmt.Errorf("list connectors: %w", ErrDisabled)
	}
	return store.List[Record](m.st, store.BucketConnectors)
}

// Stats returns a connector's counters on this host.
func (m *Manager) Stats(ctx context.Context, id uint32) (dataplane.Stats, error) {
	if m.dp == nil {
		return dataplane.Stats{}, fmt.Errorf("connector stats: %w", ErrDisabled)
	}
	return m.dp.Stats(ctx, id)
}

// Restore re-creates, after a restart, the connectors the store holds but
// the dataplane does not (the netdev backend forgets everything; the eBPF
// backend with pinned maps keeps forwarding and needs nothing).
func (m *Manager) Restore(ctx context.Context) error {
	if m.dp == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	recs, err := store.List[Record](m.st, store.BucketConnectors)
	if err != nil {
		return fmt.Errorf("restore connectors: %w", err)
	}
	live, err := m.dp.List(ctx)
	if err != nil {
		return fmt.Errorf("restore connectors: %w", err)
	}
	have := make(map[uint32]bool, len(live))
	for _, c := range live {
		have[c.ID] = true
	}
	var failed []error
	for _, r := range recs {
		if have[r.ID] {
			continue
		}
		if err := m.dp.Create(ctx, r.Dataplane); err != nil {
			failed = append(failed, err)
			continue
		}
		m.log.Info("connector restored", "id", r.ID)
	}
	return errors.Join(failed...)
}

func (m *Manager) newRecord(s Spec, dc dataplane.Connector, created, updated time.Time) Record {
	return Record{Spec: s, Dataplane: dc, MTU: m.dp.MTU(),
		Collapsed: dc.A.Host == m.self && dc.B.Host == m.self, Created: created, Updated: updated}
}

func (m *Manager) record(id uint32) (Record, error) {
	rec, err := store.Get[Record](m.st, store.BucketConnectors, key(id))
	if errors.Is(err, store.ErrNotFound) {
		return Record{}, fmt.Errorf("connector %d: %w", id, dataplane.ErrNotFound)
	}
	return rec, err
}

// key orders connectors numerically in the store.
func key(id uint32) string { return fmt.Sprintf("%010d", id) }
