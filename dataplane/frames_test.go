package dataplane

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// rawSock is an AF_PACKET socket on a VM's eth0: it sends frames exactly as
// given and receives them as they were on the wire.
type rawSock struct {
	tb testing.TB
	fd int
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (n *testNet) rawSocket(vm *testVM) *rawSock {
	n.tb.Helper()
	var fd int
	err := inNetns(vm.h, func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			return err
		}
		// The kernel moves a VLAN tag into metadata on receive; auxdata
		// hands it back so the frame can be compared whole.
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_AUXDATA, 1); err != nil {
			return err
		}
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	})
	if err != nil {
		n.tb.Fatalf("packet socket in %s: %v", vm.name, err)
	}
	n.tb.Cleanup(func() { unix.Close(fd) })
	return &rawSock{tb: n.tb, fd: fd}
}

func (r *rawSock) send(frame []byte) {
	r.tb.Helper()
	if _, err := unix.Write(r.fd, frame); err != nil {
		r.tb.Fatalf("send frame: %v", err)
	}
}

// recv returns the next incoming frame with its VLAN tag restored, or nil
// after the receive timeout.
func (r *rawSock) recv() []byte {
	buf, oob := make([]byte, 65536), make([]byte, 256)
	for i := 0; i < 100; i++ { // skip our own outgoing frames
		m, oobn, _, from, err := unix.Recvmsg(r.fd, buf, oob, 0)
		if err != nil {
			return nil
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		frame := append([]byte(nil), buf[:m]...)
		cmsgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for _, c := range cmsgs {
			if c.Header.Level != unix.SOL_PACKET || c.Header.Type != unix.PACKET_AUXDATA || len(c.Data) < 20 {
				continue
			}
			status := binary.NativeEndian.Uint32(c.Data[0:])
			tci := binary.NativeEndian.Uint16(c.Data[16:])
			tpid := binary.NativeEndian.Uint16(c.Data[18:])
			if status&unix.TP_STATUS_VLAN_VALID == 0 {
				continue
			}
			if status&unix.TP_STATUS_VLAN_TPID_VALID == 0 {
				tpid = unix.ETH_P_8021Q
			}
			tag := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, tpid), tci)
			frame = append(frame[:12], append(tag, frame[12:]...)...)
		}
		return frame
	}
	return nil
}

// await reads until want arrives, failing if any forbidden frame shows up
// first. Bounded in frames and in receive timeouts.
func (r *rawSock) await(what string, want []byte, forbidden ...[]byte) {
	r.tb.Helper()
	for i, idle := 0, 0; i < 2000 && idle < 30; i++ {
		f := r.recv()
		if f == nil {
			idle++
			continue
		}
		if bytes.Equal(f, want) {
			return
		}
		for _, bad := range forbidden {
			if bytes.Equal(f, bad) {
				r.tb.Fatalf("%s: a frame of another connector arrived: % x", what, f)
			}
		}
	}
	r.tb.Fatalf("%s: frame never arrived unchanged: % x", what, want)
}

// frame builds an Ethernet frame: dst, src, then the given tags and
// ethertype words, then a payload naming it, padded to the minimum size.
func frame(dst, src string, words []uint16, payload string) []byte {
	d, _ := net.ParseMAC(dst)
	s, _ := net.ParseMAC(src)
	f := append(append([]byte{}, d...), s...)
	for _, w := range words {
		f = binary.BigEndian.AppendUint16(f, w)
	}
	f = append(f, payload...)
	for len(f) < 60 {
		f = append(f, 0)
	}
	return f
}

const etherExp = 0x88b5 // IEEE local experimental ethertype

func TestTransparency(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		for _, collapsed := range []bool{false, true} {
			t.Run(fmt.Sprintf("collapsed=%v", collapsed), func(t *testing.T) {
				n := newTestNet(t, b, 1500, false)
				h1 := n.addHost("h1", 1)
				hb := h1
				if !collapsed {
					hb = n.addHost("h2", 2)
				}
				a := n.addVM(h1, "vma", "tapa", "02:00:00:00:00:0a", "10.0.0.1")
				bv := n.addVM(hb, "vmb", "tapb", "02:00:00:00:00:0b", "10.0.0.2")
				c := Connector{ID: 5000, A: a.ep(), B: bv.ep()}
				for _, h := range []*testHost{h1, hb} {
					if _, err := h.dp.Get(t.Context(), c.ID); err == nil {
						continue
					}
					if err := h.dp.Create(t.Context(), c); err != nil {
						t.Fatal(err)
					}
				}
				ra, rb := n.rawSocket(a), n.rawSocket(bv)
				frames := map[string][]byte{
					// Source MACs the guest's NIC does not have: guests keep any MAC.
					"broadcast":       frame("ff:ff:ff:ff:ff:ff", "02:12:34:56:78:9a", []uint16{etherExp}, "hostd broadcast"),
					"ipv4 multicast":  frame("01:00:5e:01:02:03", "02:12:34:56:78:9b", []uint16{etherExp}, "hostd multicast 4"),
					"ipv6 multicast":  frame("33:33:00:00:00:01", "02:12:34:56:78:9c", []uint16{etherExp}, "hostd multicast 6"),
					"unknown unicast": frame("02:be:ef:00:00:01", "02:12:34:56:78:9d", []uint16{etherExp}, "hostd unicast"),
					"802.1Q pcp 5 vid 100": frame("02:00:00:00:00:0b", "02:00:00:00:00:0a",
						[]uint16{unix.ETH_P_8021Q, 5<<13 | 100, etherExp}, "hostd vlan"),
					"802.1ad qinq": frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:0a",
						[]uint16{unix.ETH_P_8021AD, 200, unix.ETH_P_8021Q, 300, etherExp}, "hostd qinq"),
				}
				before, err := h1.dp.Stats(t.Context(), c.ID)
				if err != nil {
					t.Fatal(err)
				}
				for name, f := range frames {
					ra.send(f)
					rb.await("A to B "+name, f)
					rb.send(f)
					ra.await("B to A "+name, f)
				}
				// Each frame is counted once per direction through h1.
				after, err := h1.dp.Stats(t.Context(), c.ID)
				if err != nil {
					t.Fatal(err)
				}
				want := uint64(len(frames))
				if collapsed {
					want *= 2 // h1 holds both ends
				}
				if tx, rx := after.TxPackets-before.TxPackets, after.RxPackets-before.RxPackets; tx != want || rx != want {
					t.Fatalf("h1 counted %d frames in and %d out, want %d each (%+v -> %+v)", tx, rx, want, before, after)
				}
			})
		}
	})
}

func TestIsolation(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		n := newTestNet(t, b, 1500, false)
		h1, h2 := n.addHost("h1", 1), n.addHost("h2", 2)
		// Three connectors whose guests all use the same MACs and IPs.
		const macA, macB, ipA, ipB = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "10.0.0.1", "10.0.0.2"
		a1, b1 := n.addVM(h1, "a1", "tapa1", macA, ipA), n.addVM(h2, "b1", "tapb1", macB, ipB)
		a2, b2 := n.addVM(h1, "a2", "tapa2", macA, ipA), n.addVM(h2, "b2", "tapb2", macB, ipB)
		c1, c2 := n.addVM(h1, "c1", "tapc1", macA, ipA), n.addVM(h1, "c2", "tapc2", macB, ipB)
		conns := []Connector{{ID: 1, A: a1.ep(), B: b1.ep()}, {ID: 2, A: a2.ep(), B: b2.ep()}, {ID: 3, A: c1.ep(), B: c2.ep()}}
		for _, c := range conns {
			for _, h := range []*testHost{h1, h2} {
				if c.ID == 3 && h == h2 {
					continue
				}
				if err := h.dp.Create(t.Context(), c); err != nil {
					t.Fatal(err)
				}
			}
		}
		stats := func(h *testHost, id uint32) Stats {
			s, err := h.dp.Stats(t.Context(), id)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		before2, before3 := stats(h2, 2), stats(h1, 3)
		n.mustPing(a1, ipB, 10, 64)
		if s := stats(h2, 1); s.RxPackets < 10 {
			t.Fatalf("connector 1 delivered %d frames on h2, want the 10 probes", s.RxPackets)
		}
		if s := stats(h2, 2); s.RxPackets != before2.RxPackets || s.TxPackets != before2.TxPackets {
			t.Fatalf("connector 2 counted traffic of connector 1: %+v -> %+v", before2, s)
		}
		if s := stats(h1, 3); s.RxPackets != before3.RxPackets {
			t.Fatalf("connector 3 counted traffic of connector 1: %+v -> %+v", before3, s)
		}
		n.mustPing(a2, ipB, 3, 64)
		n.mustPing(c1, ipB, 3, 64)

		// Frames of connector 1 must reach only its own peer. Each other
		// endpoint must see its own sentinel without seeing them first.
		leak1 := frame("ff:ff:ff:ff:ff:ff", macA, []uint16{etherExp}, "connector 1 only")
		leak2 := frame("ff:ff:ff:ff:ff:ff", macB, []uint16{etherExp}, "connector 2 only")
		r := map[*testVM]*rawSock{}
		for _, vm := range []*testVM{a1, b1, a2, b2, c1, c2} {
			r[vm] = n.rawSocket(vm)
		}
		r[a1].send(leak1)
		r[b2].send(leak2)
		r[b1].await("connector 1 peer", leak1, leak2)
		r[a2].await("connector 2 peer", leak2, leak1)
		for _, p := range []struct{ from, to *testVM }{{a2, b2}, {b1, a1}, {c1, c2}, {c2, c1}} {
			s := frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:ff", []uint16{etherExp}, "sentinel from "+p.from.name)
			r[p.from].send(s)
			r[p.to].await("sentinel at "+p.to.name, s, leak1, leak2)
		}
	})
}
