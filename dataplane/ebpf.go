package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"hostd/bpf"
)

// Flags of bpf's struct endpoint.
const (
	epCollapse = 1
	epIPv6     = 2
)

// ebpfDataplane: one external-mode VXLAN device and the TC programs of
// hostd/bpf. Connector state lives in the programs' maps; this struct only
// remembers which devices carry a program.
//
// Programs are attached as direct-action cls_bpf filters on a clsact qdisc,
// not with tcx links: every tcx attach or detach waits for an RCU grace
// period (about 10 ms here, measured), which made 1000 connectors take 12 s
// to set up; a cls_bpf filter takes about 0.2 ms.
type ebpfDataplane struct {
	*host
	vxlan    netlink.Link
	objs     bpf.ConnectorObjects
	attached map[string]int // local endpoint device -> ifindex carrying the program
}

func newEBPF(ctx context.Context, cfg Config) (_ Dataplane, err error) {
	h, err := openHost(cfg)
	if err != nil {
		return nil, err
	}
	d := &ebpfDataplane{host: h, attached: map[string]int{}}
	defer func() {
		if err != nil {
			d.teardown()
		}
	}()
	if err := d.openVXLAN(); err != nil {
		return nil, err
	}
	spec, err := bpf.LoadConnector()
	if err != nil {
		return nil, fmt.Errorf("open dataplane: load eBPF spec: %w", err)
	}
	if err := spec.Variables[bpf.ConnectorVarVxlanIfindex].Set(uint32(d.vxlan.Attrs().Index)); err != nil {
		return nil, fmt.Errorf("open dataplane: set vxlan_ifindex: %w", err)
	}
	var opts ebpf.CollectionOptions
	if cfg.PinPath != "" {
		if err := os.MkdirAll(cfg.PinPath, 0o700); err != nil {
			return nil, fmt.Errorf("open dataplane: pin directory: %w", err)
		}
		for _, name := range []string{bpf.ConnectorMapEndpoints, bpf.ConnectorMapDeliveries, bpf.ConnectorMapCounters} {
			spec.Maps[name].Pinning = ebpf.PinByName
		}
		opts.Maps.PinPath = cfg.PinPath
	}
	if err := spec.LoadAndAssign(&d.objs, &opts); err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("open dataplane: maps pinned in %s are from another version; delete the connectors with the old hostd or remove the directory: %w", cfg.PinPath, err)
		}
		return nil, fmt.Errorf("open dataplane: load eBPF programs (needs root or CAP_BPF+CAP_NET_ADMIN and a bpffs at PinPath if set; or use backend %q): %w", BackendNetdev, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open dataplane: %w", err)
	}
	if err := d.attach(d.vxlan.Attrs().Index, d.objs.VxlanIngress); err != nil {
		return nil, fmt.Errorf("open dataplane: attach to %s ingress: %w", cfg.VXLANDevice, err)
	}
	if cfg.PinPath != "" {
		if err := d.adopt(); err != nil {
			return nil, err
		}
	}
	h.log.Info("dataplane open", "vxlan", cfg.VXLANDevice, "mtu", h.mtu, "connectors", len(d.conns))
	return d, nil
}

// adopt rebuilds the registry from pinned maps left by an earlier run and
// moves the devices onto this run's programs (a cls_bpf replace is atomic,
// and the maps are shared, so no frame is lost). The maps keep what the data
// path needs: a recovered connector names its remote endpoint's host but not
// that host's device, and a collapsed one has its ends in ifindex order.
func (d *ebpfDataplane) adopt() error {
	type local struct {
		dev     string
		ifindex int
		ep      bpf.ConnectorEndpoint
	}
	byID := map[uint32][]local{}
	var stale []uint32
	var ifindex uint32
	var ep bpf.ConnectorEndpoint
	it := d.objs.Endpoints.Iterate()
	for it.Next(&ifindex, &ep) {
		l, err := d.nl.LinkByIndex(int(ifindex))
		if err != nil {
			stale = append(stale, ifindex) // the VM's tap went away meanwhile
			continue
		}
		byID[ep.Id] = append(byID[ep.Id], local{l.Attrs().Name, int(ifindex), ep})
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("open dataplane: read pinned endpoints: %w", err)
	}
	for _, i := range stale {
		d.objs.Endpoints.Delete(i)
	}
	for id, ls := range byID {
		slices.SortFunc(ls, func(a, b local) int { return a.ifindex - b.ifindex })
		self := Endpoint{Host: d.cfg.Underlay, Device: ls[0].dev}
		var c Connector
		switch {
		case len(ls) == 2 && ls[0].ep.Flags&epCollapse != 0:
			c = Connector{ID: id, A: self, B: Endpoint{Host: d.cfg.Underlay, Device: ls[1].dev}}
		case len(ls) == 1 && ls[0].ep.Flags&epCollapse == 0:
			remote, ok := netip.AddrFromSlice(ls[0].ep.Remote[:])
			if ls[0].ep.Flags&epIPv6 == 0 {
				remote, ok = netip.AddrFromSlice(ls[0].ep.Remote[:4])
			}
			if !ok {
				continue
			}
			c = Connector{ID: id, A: self, B: Endpoint{Host: remote}}
		default:
			d.log.Warn("pinned connector is inconsistent; Create it again", "id", id, "devices", len(ls))
			continue
		}
		p, err := c.plan(d.cfg.Underlay)
		if err != nil {
			d.log.Warn("pinned connector does not fit this host; Create it again", "id", id, "err", err)
			continue
		}
		for _, l := range ls {
			if err := d.attach(l.ifindex, d.objs.EndpointIngress); err != nil {
				return fmt.Errorf("open dataplane: re-attach %q of connector %d: %w", l.dev, id, err)
			}
			d.attached[l.dev] = l.ifindex
		}
		d.record(c, p)
	}
	var id uint32
	var dl bpf.ConnectorDelivery
	var orphans []uint32
	for it := d.objs.Deliveries.Iterate(); it.Next(&id, &dl); {
		if _, ok := d.conns[id]; !ok {
			orphans = append(orphans, id)
		}
	}
	for _, id := range orphans {
		d.objs.Deliveries.Delete(id)
	}
	return nil
}

// openVXLAN creates the host's external-mode VXLAN device, or adopts one
// left by an earlier run.
func (d *ebpfDataplane) openVXLAN() error {
	name := d.cfg.VXLANDevice
	if l, err := d.nl.LinkByName(name); err == nil {
		vx, ok := l.(*netlink.Vxlan)
		if !ok || !vx.FlowBased || vx.Port != int(d.cfg.Port) {
			return fmt.Errorf("open dataplane: %w: %q exists and is not an external-mode VXLAN device on port %d; remove it or set Config.VXLANDevice",
				ErrInvalid, name, d.cfg.Port)
		}
		d.vxlan = vx
	} else {
		vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: d.mtu},
			FlowBased: true, Port: int(d.cfg.Port), Learning: false}
		if err := d.nl.LinkAdd(vx); err != nil {
			return fmt.Errorf("open dataplane: create VXLAN device %q on port %d: %w", name, d.cfg.Port, err)
		}
		l, err := d.nl.LinkByName(name)
		if err != nil {
			return fmt.Errorf("open dataplane: VXLAN device %q: %w", name, err)
		}
		d.vxlan = l
	}
	if err := d.nl.LinkSetMTU(d.vxlan, d.mtu); err != nil {
		return fmt.Errorf("open dataplane: set MTU %d on %q: %w", d.mtu, name, err)
	}
	if err := d.nl.LinkSetUp(d.vxlan); err != nil {
		return fmt.Errorf("open dataplane: bring %q up: %w", name, err)
	}
	return nil
}

func (d *ebpfDataplane) Backend() Backend { return BackendEBPF }

// Our filter's place on a device's clsact ingress hook.
const (
	filterPrio   = 1
	filterHandle = 1
)

// attach puts prog on ifindex's ingress, replacing an earlier instance (for
// example one left by a previous run of hostd).
func (d *ebpfDataplane) attach(ifindex int, prog *ebpf.Program) error {
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := d.nl.QdiscReplace(q); err != nil {
		return fmt.Errorf("clsact qdisc: %w", err)
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS,
			Handle: filterHandle, Priority: filterPrio, Protocol: unix.ETH_P_ALL},
		Fd: prog.FD(), Name: "hostd-connector", DirectAction: true,
	}
	if err := d.nl.FilterReplace(f); err != nil {
		return fmt.Errorf("bpf filter: %w", err)
	}
	return nil
}

func (d *ebpfDataplane) detach(ifindex int) error {
	f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS,
		Handle: filterHandle, Priority: filterPrio, Protocol: unix.ETH_P_ALL}}
	if err := d.nl.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
		return err
	}
	return nil
}

func (d *ebpfDataplane) Create(ctx context.Context, c Connector) error {
	return d.apply(ctx, "create", c, false)
}

func (d *ebpfDataplane) Update(ctx context.Context, c Connector) error {
	return d.apply(ctx, "update", c, true)
}

// apply moves the maps from the connector's current state (none for create)
// to c. Entries are written before programs are attached, so a device's
// first frame already finds its connector, and a retarget that keeps the
// local devices is a single map write per endpoint.
func (d *ebpfDataplane) apply(ctx context.Context, op string, c Connector, exists bool) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s connector %d: %w", op, c.ID, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.check(op, c, exists)
	if err != nil {
		return err
	}
	idx, err := d.prepareDevices(op, c.ID, p.local)
	if err != nil {
		return err
	}
	eps := make([]bpf.ConnectorEndpoint, len(p.local))
	for i := range p.local {
		ep := &eps[i]
		ep.Id = c.ID
		if p.collapsed() {
			ep.Flags = epCollapse
			ep.PeerIfindex = uint32(idx[1-i])
			continue
		}
		if d.cfg.Underlay.Is6() {
			ep.Flags |= epIPv6
		}
		ep.Remote, ep.Local = ipBytes(p.remote), ipBytes(d.cfg.Underlay)
	}
	if err := d.program(op, c.ID, p, idx, eps); err != nil {
		if !exists {
			d.unprogram(c.ID, p, idx)
		}
		return err
	}
	if old, ok := d.plans[c.ID]; ok {
		d.release(old, p)
	}
	d.record(c, p)
	d.log.Info(op+" connector", "id", c.ID, "local", p.local, "remote", p.remote, "collapsed", p.collapsed())
	return nil
}

// program writes a connector's map entries and attaches its devices.
func (d *ebpfDataplane) program(op string, id uint32, p plan, idx []int, eps []bpf.ConnectorEndpoint) error {
	var err error
	for i := range eps {
		if err := d.objs.Endpoints.Put(uint32(idx[i]), &eps[i]); err != nil {
			return fmt.Errorf("%s connector %d: write endpoint map for %q: %w", op, id, p.local[i], err)
		}
	}
	if p.collapsed() {
		err = d.objs.Deliveries.Delete(id)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			err = nil
		}
	} else {
		err = d.objs.Deliveries.Put(id, &bpf.ConnectorDelivery{Ifindex: uint32(idx[0]), Flags: eps[0].Flags, Remote: eps[0].Remote})
	}
	if err != nil {
		return fmt.Errorf("%s connector %d: write delivery map: %w", op, id, err)
	}
	for i, dev := range p.local {
		if ifindex, ok := d.attached[dev]; ok && ifindex == idx[i] {
			continue
		}
		if err := d.attach(idx[i], d.objs.EndpointIngress); err != nil {
			return fmt.Errorf("%s connector %d: attach to %q ingress: %w", op, id, dev, err)
		}
		d.attached[dev] = idx[i]
	}
	return nil
}

// unprogram undoes a failed create, so that it leaves nothing behind.
func (d *ebpfDataplane) unprogram(id uint32, p plan, idx []int) {
	for i, dev := range p.local {
		if ifindex, ok := d.attached[dev]; ok {
			if err := d.detach(ifindex); err != nil {
				d.log.Warn("detach endpoint", "device", dev, "err", err)
			}
			delete(d.attached, dev)
		}
		d.objs.Endpoints.Delete(uint32(idx[i]))
	}
	d.objs.Deliveries.Delete(id)
}

// release detaches the devices of old that keep is not using any more.
func (d *ebpfDataplane) release(old, keep plan) {
	for _, dev := range old.local {
		used := false
		for _, k := range keep.local {
			used = used || k == dev
		}
		if used {
			continue
		}
		if ifindex, ok := d.attached[dev]; ok {
			if err := d.detach(ifindex); err != nil {
				d.log.Warn("detach endpoint", "device", dev, "err", err)
			}
			delete(d.attached, dev)
			if err := d.objs.Endpoints.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				d.log.Warn("delete endpoint entry", "device", dev, "err", err)
			}
		}
	}
}

func (d *ebpfDataplane) Delete(ctx context.Context, id uint32) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete connector %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.lookup("delete", id)
	if err != nil {
		return err
	}
	d.release(p, plan{})
	for _, m := range []*ebpf.Map{d.objs.Deliveries, d.objs.Counters} {
		if err := m.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete connector %d: map %s: %w", id, m, err)
		}
	}
	d.forget(id)
	d.log.Info("delete connector", "id", id)
	return nil
}

func (d *ebpfDataplane) Stats(ctx context.Context, id uint32) (Stats, error) {
	if err := ctx.Err(); err != nil {
		return Stats{}, fmt.Errorf("stats of connector %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, err := d.lookup("stats of", id); err != nil {
		return Stats{}, err
	}
	var per []bpf.ConnectorCounters
	if err := d.objs.Counters.Lookup(id, &per); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Stats{}, nil
		}
		return Stats{}, fmt.Errorf("stats of connector %d: %w", id, err)
	}
	var s Stats
	for _, c := range per {
		s.TxPackets += c.TxPackets
		s.TxBytes += c.TxBytes
		s.RxPackets += c.RxPackets
		s.RxBytes += c.RxBytes
		s.Drops += c.Drops
	}
	return s, nil
}

func (d *ebpfDataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	if d.cfg.PinPath != "" {
		// Leave the kernel forwarding for the next run to adopt.
		d.objs.Close()
		d.nl.Close()
		d.log.Info("dataplane closed; connectors stay up", "pinned", d.cfg.PinPath)
		return nil
	}
	return d.teardown()
}

func (d *ebpfDataplane) teardown() error {
	if d.cfg.PinPath != "" {
		// A failed open of a pinned dataplane must not take down the
		// connectors an earlier run left forwarding.
		d.objs.Close()
		d.nl.Close()
		return nil
	}
	var errs []error
	for dev, ifindex := range d.attached {
		if err := d.detach(ifindex); err != nil {
			errs = append(errs, fmt.Errorf("detach %q: %w", dev, err))
		}
	}
	if err := d.objs.Close(); err != nil {
		errs = append(errs, err)
	}
	if d.vxlan != nil {
		if err := d.nl.LinkDel(d.vxlan); err != nil {
			errs = append(errs, fmt.Errorf("delete %q: %w", d.cfg.VXLANDevice, err))
		}
	}
	d.nl.Close()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close dataplane: %w", err)
	}
	return nil
}
