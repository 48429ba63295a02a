package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// netdevDataplane: the fallback without eBPF. Each connector with a remote
// end gets its own VXLAN netdev (VNI = ID) whose remote is the peer host; tc
// mirred redirects (u32 match-all, the classifier every kernel with tc has)
// join it to the tap in both directions. A collapsed connector is two mirred
// redirects between the taps.
type netdevDataplane struct {
	*host
	base map[uint32]Stats // device counters when the connector was set up here
}

func newNetdev(ctx context.Context, cfg Config) (Dataplane, error) {
	h, err := openHost(cfg)
	if err != nil {
		return nil, err
	}
	h.log.Info("dataplane open", "mtu", h.mtu)
	return &netdevDataplane{host: h, base: map[uint32]Stats{}}, nil
}

func (d *netdevDataplane) Backend() Backend { return BackendNetdev }

// vxlanName is the per-connector device; "vwc" keeps it apart from the eBPF
// backend's shared device.
func vxlanName(id uint32) string { return fmt.Sprintf("vwc%d", id) }

func (d *netdevDataplane) Create(ctx context.Context, c Connector) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("create connector %d: %w", c.ID, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.check("create", c, false)
	if err != nil {
		return err
	}
	if err := d.build("create", p); err != nil {
		d.destroy(p)
		return err
	}
	d.record(c, p)
	d.log.Info("create connector", "id", c.ID, "local", p.local, "remote", p.remote, "collapsed", p.collapsed())
	return nil
}

func (d *netdevDataplane) Update(ctx context.Context, c Connector) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("update connector %d: %w", c.ID, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.check("update", c, true)
	if err != nil {
		return err
	}
	old := d.plans[c.ID]
	if !old.collapsed() && !p.collapsed() && old.local[0] == p.local[0] {
		// The common retarget: the local VM stays, its peer moved. One
		// FDB entry changes; the devices and redirects stay.
		if err := d.setRemote("update", c.ID, p.remote); err != nil {
			return err
		}
	} else {
		d.destroy(old)
		if err := d.build("update", p); err != nil {
			d.destroy(p)
			d.forget(c.ID)
			return fmt.Errorf("%w (the connector was removed; Create it again)", err)
		}
	}
	d.record(c, p)
	d.log.Info("update connector", "id", c.ID, "local", p.local, "remote", p.remote, "collapsed", p.collapsed())
	return nil
}

func (d *netdevDataplane) Delete(ctx context.Context, id uint32) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete connector %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.lookup("delete", id)
	if err != nil {
		return err
	}
	if err := d.destroy(p); err != nil {
		return fmt.Errorf("delete connector %d: %w", id, err)
	}
	d.forget(id)
	delete(d.base, id)
	d.log.Info("delete connector", "id", id)
	return nil
}

func (d *netdevDataplane) build(op string, p plan) error {
	idx, err := d.prepareDevices(op, p.id, p.local)
	if err != nil {
		return err
	}
	if p.collapsed() {
		if err := d.redirect(op, p.id, idx[0], idx[1]); err != nil {
			return err
		}
		if err := d.redirect(op, p.id, idx[1], idx[0]); err != nil {
			return err
		}
		d.base[p.id], err = d.collapsedCounters(p)
		return err
	}
	name := vxlanName(p.id)
	vx := &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{Name: name, MTU: d.mtu},
		VxlanId:   int(p.id), VtepDevIndex: d.underlay.Attrs().Index,
		SrcAddr: netIP(d.cfg.Underlay), Group: netIP(p.remote), Port: int(d.cfg.Port), Learning: false,
	}
	if err := d.nl.LinkAdd(vx); err != nil {
		return fmt.Errorf("%s connector %d: create VXLAN device %q: %w", op, p.id, name, err)
	}
	l, err := d.nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("%s connector %d: VXLAN device %q: %w", op, p.id, name, err)
	}
	if err := d.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("%s connector %d: bring %q up: %w", op, p.id, name, err)
	}
	if err := d.redirect(op, p.id, idx[0], l.Attrs().Index); err != nil {
		return err
	}
	if err := d.redirect(op, p.id, l.Attrs().Index, idx[0]); err != nil {
		return err
	}
	d.base[p.id] = Stats{}
	return nil
}

// setRemote retargets the connector's VXLAN device with a changelink of
// only its remote: one netlink message, and the kernel swaps the default FDB
// entry in place (an FDB replace of the all-zeros entry is refused).
func (d *netdevDataplane) setRemote(op string, id uint32, remote netip.Addr) error {
	l, err := d.nl.LinkByName(vxlanName(id))
	if err != nil {
		return fmt.Errorf("%s connector %d: VXLAN device: %w", op, id, err)
	}
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(l.Attrs().Index)
	req.AddData(msg)
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("vxlan"))
	data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
	if remote.Is4() {
		data.AddRtAttr(nl.IFLA_VXLAN_GROUP, netIP(remote))
	} else {
		data.AddRtAttr(nl.IFLA_VXLAN_GROUP6, netIP(remote))
	}
	req.AddData(info)
	err = inNetns(d.cfg.Netns, func() error {
		_, err := req.Execute(unix.NETLINK_ROUTE, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("%s connector %d: point %s at %s: %w", op, id, vxlanName(id), remote, err)
	}
	return nil
}

// redirect sends every frame arriving on from out of to.
func (d *netdevDataplane) redirect(op string, id uint32, from, to int) error {
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: from,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := d.nl.QdiscReplace(q); err != nil {
		return fmt.Errorf("%s connector %d: clsact on ifindex %d: %w", op, id, from, err)
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: from, Parent: netlink.HANDLE_MIN_INGRESS,
			Priority: 1, Protocol: unix.ETH_P_ALL},
		Sel:     &netlink.TcU32Sel{Flags: nl.TC_U32_TERMINAL, Nkeys: 1, Keys: []netlink.TcU32Key{{}}},
		Actions: []netlink.Action{netlink.NewMirredAction(to)},
	}
	if err := d.nl.FilterAdd(f); err != nil {
		return fmt.Errorf("%s connector %d: redirect ifindex %d to %d: %w", op, id, from, to, err)
	}
	return nil
}

// destroy removes what build made; it tolerates a partial build.
func (d *netdevDataplane) destroy(p plan) error {
	var errs []error
	for _, dev := range p.local {
		l, err := d.nl.LinkByName(dev)
		if err != nil {
			continue // the VM's tap is gone, and its qdiscs with it
		}
		q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index,
			Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
		if err := d.nl.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("remove redirect from %q: %w", dev, err))
		}
	}
	if !p.collapsed() {
		if l, err := d.nl.LinkByName(vxlanName(p.id)); err == nil {
			if err := d.nl.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %q: %w", vxlanName(p.id), err))
			}
		}
	}
	return errors.Join(errs...)
}

func (d *netdevDataplane) Stats(ctx context.Context, id uint32) (Stats, error) {
	if err := ctx.Err(); err != nil {
		return Stats{}, fmt.Errorf("stats of connector %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.lookup("stats of", id)
	if err != nil {
		return Stats{}, err
	}
	var s Stats
	if p.collapsed() {
		s, err = d.collapsedCounters(p)
	} else {
		var l netlink.Link
		l, err = d.nl.LinkByName(vxlanName(id))
		if err == nil {
			st := l.Attrs().Statistics
			s = Stats{TxPackets: st.TxPackets, TxBytes: st.TxBytes, RxPackets: st.RxPackets, RxBytes: st.RxBytes,
				Drops: st.TxDropped + st.RxDropped + st.TxErrors + st.RxErrors}
		}
	}
	if err != nil {
		return Stats{}, fmt.Errorf("stats of connector %d: %w", id, err)
	}
	b := d.base[id]
	s.TxPackets -= b.TxPackets
	s.TxBytes -= b.TxBytes
	s.RxPackets -= b.RxPackets
	s.RxBytes -= b.RxBytes
	s.Drops -= b.Drops
	return s, nil
}

// collapsedCounters: the taps are dedicated to the connector, so what the
// host receives on them entered the connector and what it sends left it.
func (d *netdevDataplane) collapsedCounters(p plan) (Stats, error) {
	var s Stats
	for _, dev := range p.local {
		l, err := d.nl.LinkByName(dev)
		if err != nil {
			return Stats{}, fmt.Errorf("counters of %q: %w", dev, err)
		}
		st := l.Attrs().Statistics
		s.TxPackets += st.RxPackets
		s.TxBytes += st.RxBytes
		s.RxPackets += st.TxPackets
		s.RxBytes += st.TxBytes
		s.Drops += st.TxDropped
	}
	return s, nil
}

func (d *netdevDataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	for id, p := range d.plans {
		if err := d.destroy(p); err != nil {
			errs = append(errs, fmt.Errorf("connector %d: %w", id, err))
		}
	}
	d.nl.Close()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close dataplane: %w", err)
	}
	return nil
}
