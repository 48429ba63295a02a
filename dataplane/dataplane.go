package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sort"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Dataplane configures the connectors whose endpoints live on this host.
// Implementations are safe for concurrent use.
type Dataplane interface {
	// Create sets up this host's endpoints of a new connector.
	Create(ctx context.Context, c Connector) error
	// Update retargets an existing connector, typically because one of its
	// endpoints moved to another host. The logical port is unchanged, so
	// the guests need no ARP.
	Update(ctx context.Context, c Connector) error
	// Delete removes this host's endpoints of a connector.
	Delete(ctx context.Context, id uint32) error
	Get(ctx context.Context, id uint32) (Connector, error)
	// List returns the connectors configured on this host, by ID.
	List(ctx context.Context) ([]Connector, error)
	Stats(ctx context.Context, id uint32) (Stats, error)
	// MTU is the inner MTU every endpoint device is set to: the underlay
	// MTU minus the VXLAN overhead. Guests should use it (virtio-net mtu).
	MTU() int
	// Backend names the implementation.
	Backend() Backend
	// Close removes everything this dataplane set up on the host.
	Close() error
}

// Backend selects a Dataplane implementation.
type Backend string

const (
	BackendEBPF   Backend = "ebpf"
	BackendNetdev Backend = "netdev"
)

// DefaultPort is the IANA VXLAN port.
const DefaultPort = 4789

// Config configures a host's dataplane.
type Config struct {
	Backend Backend
	// Underlay is this host's underlay address; endpoints whose Host equals
	// it are local.
	Underlay netip.Addr
	// UnderlayDevice carries Underlay; found from the address if empty.
	// Its MTU determines the connectors' MTU.
	UnderlayDevice string
	// VXLANDevice names the eBPF backend's shared external-mode VXLAN
	// device; "vw0" if empty.
	VXLANDevice string
	// Port is the underlay UDP port; DefaultPort if zero.
	Port uint16
	// PinPath (eBPF backend only) is a directory on a bpffs where the
	// connector maps are pinned. With it, connectors outlive the process:
	// Close leaves them forwarding, and the next New adopts them, so a
	// hostd restart does not interrupt guests. Empty: Close removes all.
	PinPath string
	// Netns is the network namespace to configure; a value <= 0 means the
	// caller's own. Tests use it for namespaces standing in for hosts.
	Netns  netns.NsHandle
	Logger *slog.Logger
}

// New opens the dataplane of this host with the configured backend.
func New(ctx context.Context, cfg Config) (Dataplane, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open dataplane: %w", err)
	}
	if !cfg.Underlay.IsValid() || cfg.Underlay.IsUnspecified() || cfg.Underlay.IsMulticast() {
		return nil, fmt.Errorf("open dataplane: %w: underlay address %q is not a unicast address; set Config.Underlay to this host's underlay IP", ErrInvalid, cfg.Underlay)
	}
	cfg.Underlay = cfg.Underlay.Unmap()
	if cfg.VXLANDevice == "" {
		cfg.VXLANDevice = "vw0"
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Logger = cfg.Logger.With("component", "dataplane", "backend", string(cfg.Backend), "underlay", cfg.Underlay.String())
	if cfg.PinPath != "" && cfg.Backend != BackendEBPF {
		return nil, fmt.Errorf("open dataplane: %w: PinPath needs backend %q; leave it empty for %q", ErrInvalid, BackendEBPF, cfg.Backend)
	}
	switch cfg.Backend {
	case BackendEBPF:
		return newEBPF(ctx, cfg)
	case BackendNetdev:
		return newNetdev(ctx, cfg)
	default:
		return nil, fmt.Errorf("open dataplane: %w: unknown backend %q; use %q or %q", ErrInvalid, cfg.Backend, BackendEBPF, BackendNetdev)
	}
}

// host is what both backends share: the netlink handle of the host's
// namespace, the underlay, and the registry of configured connectors.
type host struct {
	cfg      Config
	log      *slog.Logger
	nl       *netlink.Handle
	underlay netlink.Link
	mtu      int

	mu     sync.Mutex
	closed bool
	conns  map[uint32]Connector
	plans  map[uint32]plan
	devs   map[string]uint32 // local device -> connector
}

func openHost(cfg Config) (*host, error) {
	var nl *netlink.Handle
	var err error
	if cfg.Netns > 0 {
		nl, err = netlink.NewHandleAt(cfg.Netns)
	} else {
		nl, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open dataplane: netlink: %w", err)
	}
	h := &host{cfg: cfg, log: cfg.Logger, nl: nl,
		conns: map[uint32]Connector{}, plans: map[uint32]plan{}, devs: map[string]uint32{}}
	if h.underlay, err = h.findUnderlay(); err != nil {
		nl.Close()
		return nil, err
	}
	h.mtu = innerMTU(h.underlay.Attrs().MTU, cfg.Underlay.Is6())
	if h.mtu < 576 {
		nl.Close()
		return nil, fmt.Errorf("open dataplane: %w: underlay %s MTU %d leaves %d for connectors; raise the underlay MTU",
			ErrInvalid, h.underlay.Attrs().Name, h.underlay.Attrs().MTU, h.mtu)
	}
	return h, nil
}

func (h *host) findUnderlay() (netlink.Link, error) {
	if h.cfg.UnderlayDevice != "" {
		l, err := h.nl.LinkByName(h.cfg.UnderlayDevice)
		if err != nil {
			return nil, fmt.Errorf("open dataplane: underlay device %q: %w: %w; set Config.UnderlayDevice to the interface carrying %s",
				h.cfg.UnderlayDevice, ErrUnknownDevice, err, h.cfg.Underlay)
		}
		return l, nil
	}
	addrs, err := h.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("open dataplane: list addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == h.cfg.Underlay {
			l, err := h.nl.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("open dataplane: underlay device of %s: %w", h.cfg.Underlay, err)
			}
			return l, nil
		}
	}
	return nil, fmt.Errorf("open dataplane: %w: no interface has the underlay address %s; assign it first or set Config.UnderlayDevice",
		ErrUnknownDevice, h.cfg.Underlay)
}

// check validates c for op against the registry; exists says whether the
// connector must (Update) or must not (Create) be configured already. The
// caller holds h.mu.
func (h *host) check(op string, c Connector, exists bool) (plan, error) {
	if h.closed {
		return plan{}, fmt.Errorf("%s connector %d: %w", op, c.ID, ErrClosed)
	}
	p, err := c.plan(h.cfg.Underlay)
	if err != nil {
		return plan{}, fmt.Errorf("%s %w", op, err)
	}
	_, have := h.conns[c.ID]
	switch {
	case have && !exists:
		return plan{}, fmt.Errorf("%s connector %d: %w; Delete it first or Update it to retarget", op, c.ID, ErrExists)
	case !have && exists:
		return plan{}, fmt.Errorf("%s connector %d: %w on this host; Create it first", op, c.ID, ErrNotFound)
	}
	for _, d := range p.local {
		if other, ok := h.devs[d]; ok && other != c.ID {
			return plan{}, fmt.Errorf("%s connector %d: device %q: %w %d; a NIC belongs to one connector", op, c.ID, d, ErrDeviceInUse, other)
		}
		if _, err := h.nl.LinkByName(d); err != nil {
			return plan{}, fmt.Errorf("%s connector %d: device %q: %w: %w; create the VM's tap before its connector", op, c.ID, d, ErrUnknownDevice, err)
		}
	}
	return p, nil
}

func (h *host) record(c Connector, p plan) {
	if old, ok := h.plans[c.ID]; ok {
		for _, d := range old.local {
			delete(h.devs, d)
		}
	}
	h.conns[c.ID], h.plans[c.ID] = c, p
	for _, d := range p.local {
		h.devs[d] = c.ID
	}
}

func (h *host) forget(id uint32) {
	for _, d := range h.plans[id].local {
		delete(h.devs, d)
	}
	delete(h.conns, id)
	delete(h.plans, id)
}

// lookup returns a configured connector's plan; the caller holds h.mu.
func (h *host) lookup(op string, id uint32) (plan, error) {
	if h.closed {
		return plan{}, fmt.Errorf("%s connector %d: %w", op, id, ErrClosed)
	}
	p, ok := h.plans[id]
	if !ok {
		return plan{}, fmt.Errorf("%s connector %d: %w on this host; List shows the configured ones", op, id, ErrNotFound)
	}
	return p, nil
}

func (h *host) Get(ctx context.Context, id uint32) (Connector, error) {
	if err := ctx.Err(); err != nil {
		return Connector{}, fmt.Errorf("get connector %d: %w", id, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := h.lookup("get", id); err != nil {
		return Connector{}, err
	}
	return h.conns[id], nil
}

func (h *host) List(ctx context.Context) ([]Connector, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list connectors: %w", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]Connector, 0, len(h.conns))
	for _, c := range h.conns {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (h *host) MTU() int { return h.mtu }

// prepareDevices sets the connector MTU on local endpoint devices and brings
// them up, returning their ifindexes.
func (h *host) prepareDevices(op string, id uint32, devs []string) ([]int, error) {
	idx := make([]int, len(devs))
	for i, d := range devs {
		l, err := h.nl.LinkByName(d)
		if err != nil {
			return nil, fmt.Errorf("%s connector %d: device %q: %w: %w", op, id, d, ErrUnknownDevice, err)
		}
		if l.Attrs().MTU != h.mtu {
			if err := h.nl.LinkSetMTU(l, h.mtu); err != nil {
				return nil, fmt.Errorf("%s connector %d: set MTU %d on %q: %w", op, id, h.mtu, d, err)
			}
		}
		if err := h.nl.LinkSetUp(l); err != nil {
			return nil, fmt.Errorf("%s connector %d: bring %q up: %w", op, id, d, err)
		}
		idx[i] = l.Attrs().Index
	}
	return idx, nil
}

// inNetns runs fn on a thread in namespace ns (or directly when ns <= 0),
// for the few kernel calls that act on the caller's namespace, such as
// attaching by ifindex. A thread that cannot be switched back is left
// locked, so the runtime discards it instead of reusing it elsewhere.
func inNetns(ns netns.NsHandle, fn func() error) error {
	if ns <= 0 {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("enter namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter namespace: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leave namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

func ipBytes(a netip.Addr) [16]byte {
	var b [16]byte
	if a.Is4() {
		v := a.As4()
		copy(b[:], v[:])
		return b
	}
	return a.As16()
}

func netIP(a netip.Addr) net.IP { return net.IP(a.AsSlice()) }
