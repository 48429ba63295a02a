package dataplane

import (
	"fmt"
	"hostd/hostd/errdefs"
	"net/netip"
)

// MaxID is the largest connector ID: IDs travel as the 24-bit VXLAN VNI.
const MaxID = 1<<24 - 1

// VXLAN encapsulation overhead on the underlay: outer Ethernet 14 + IP + UDP 8
// + VXLAN 8. The inner MTU is the underlay MTU minus this.
const (
	OverheadIPv4 = 50
	OverheadIPv6 = 70
)

// Errors a caller can test with errors.Is. Every returned error wraps one of
// these (or a system error) with the operation and the connector.
var (
	ErrInvalid       = errdefs.New(errdefs.ErrInvalid, "invalid_request", "invalid connector")
	ErrExists        = errdefs.New(errdefs.ErrConflict, "exists", "connector ID already in use")
	ErrNotFound      = errdefs.New(errdefs.ErrNotFound, "not_found", "no such connector")
	ErrNotLocal      = errdefs.New(errdefs.ErrInvalid, "invalid_request", "no endpoint on this host")
	ErrDeviceInUse   = errdefs.New(errdefs.ErrInvalid, "invalid_request", "device already attached to another connector")
	ErrUnknownDevice = errdefs.New(errdefs.ErrInvalid, "invalid_request", "unknown local device")
	ErrClosed        = errdefs.New(errdefs.ErrUnavailable, "dataplane_closed", "dataplane closed")
)

// Endpoint is one end of a connector: the host running the VM and, on that
// host, the VM's NIC as a netdev (its tap).
type Endpoint struct {
	// Host is the underlay address of the host running the endpoint's VM.
	Host netip.Addr `json:"host"`
	// Device is the VM's tap on Host. Required on the endpoint's own host;
	// other hosts ignore it.
	Device string `json:"device,omitempty"`
}

func (e Endpoint) String() string { return e.Host.String() + "/" + e.Device }

// Connector is a point-to-point layer-2 link between two endpoints.
type Connector struct {
	ID uint32   `json:"id"`
	A  Endpoint `json:"a"`
	B  Endpoint `json:"b"`
}

// Stats are a connector's counters on this host since it was created here.
type Stats struct {
	TxPackets uint64 `json:"tx_packets"` // frames taken from local endpoints into the connector
	TxBytes   uint64 `json:"tx_bytes"`
	RxPackets uint64 `json:"rx_packets"` // frames delivered to local endpoints
	RxBytes   uint64 `json:"rx_bytes"`
	// Drops counts frames of this connector the host could not deliver,
	// including (eBPF backend) frames that arrived for it before it was
	// created here: the loss while an endpoint moves.
	Drops uint64 `json:"drops"`
}

// plan is what one host has to do for a connector.
type plan struct {
	id     uint32
	local  []string   // local endpoint devices: one, or two when collapsed
	remote netip.Addr // the peer host when len(local) == 1
}

func (p plan) collapsed() bool { return len(p.local) == 2 }

// Validate checks c as the host with underlay address self would, without
// touching the kernel: what the daemon can check before accepting a request.
// Create and Update also check the registry and the local devices.
func (c Connector) Validate(self netip.Addr) error {
	_, err := c.plan(self.Unmap())
	return err
}

// plan checks c as seen from the host whose underlay address is self and
// returns what that host has to configure.
func (c Connector) plan(self netip.Addr) (plan, error) {
	bad := func(format string, a ...any) (plan, error) {
		return plan{}, fmt.Errorf("connector %d: %w: %s", c.ID, ErrInvalid, fmt.Sprintf(format, a...))
	}
	if c.ID == 0 || c.ID > MaxID {
		return bad("ID %d out of range 1..%d (it is carried as the 24-bit VXLAN VNI); pick another ID", c.ID, MaxID)
	}
	for _, e := range []struct {
		name string
		ep   Endpoint
	}{{"A", c.A}, {"B", c.B}} {
		h := e.ep.Host
		if !h.IsValid() || h.IsUnspecified() || h.IsMulticast() || h.IsLoopback() {
			return bad("endpoint %s host %q is not a unicast underlay address; give the underlay IP of the host running the VM", e.name, h)
		}
		if h.Unmap().Is4() != self.Is4() {
			return bad("endpoint %s host %s is not in the underlay's address family (this host is %s); use one family per underlay", e.name, h, self)
		}
		if len(e.ep.Device) > 15 {
			return bad("endpoint %s device %q is longer than a Linux interface name (15); give the tap's name", e.name, e.ep.Device)
		}
	}
	a, b := c.A, c.B
	a.Host, b.Host = a.Host.Unmap(), b.Host.Unmap()
	if a == b {
		return bad("both ends are the same NIC %s; a connector joins two different NICs", a)
	}
	p := plan{id: c.ID}
	for _, e := range []Endpoint{a, b} {
		if e.Host != self {
			p.remote = e.Host
			continue
		}
		if e.Device == "" {
			return bad("endpoint on this host (%s) has no device; give the VM's tap name", self)
		}
		p.local = append(p.local, e.Device)
	}
	switch len(p.local) {
	case 0:
		return plan{}, fmt.Errorf("connector %d: %w: neither %s nor %s is this host (%s); configure it on the endpoints' hosts, or Delete it here if an endpoint moved away",
			c.ID, ErrNotLocal, a.Host, b.Host, self)
	case 2:
		p.remote = netip.Addr{}
	}
	return p, nil
}

// innerMTU is the largest frame payload a connector carries over an underlay
// of the given MTU.
func innerMTU(underlayMTU int, ipv6 bool) int {
	if ipv6 {
		return underlayMTU - OverheadIPv6
	}
	return underlayMTU - OverheadIPv4
}
