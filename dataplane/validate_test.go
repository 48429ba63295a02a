package dataplane

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestPlan covers validation and the local/remote/collapsed decision; pure
// logic, no kernel involved.
func TestPlan(t *testing.T) {
	self := netip.MustParseAddr("192.0.2.1")
	peer := netip.MustParseAddr("192.0.2.2")
	other := netip.MustParseAddr("192.0.2.3")
	ep := func(h netip.Addr, d string) Endpoint { return Endpoint{Host: h, Device: d} }
	cases := []struct {
		name      string
		c         Connector
		err       error
		hint      string
		local     []string
		remote    netip.Addr
		collapsed bool
	}{
		{"remote peer", Connector{1, ep(self, "tap0"), ep(peer, "tapx")}, nil, "", []string{"tap0"}, peer, false},
		{"local on B side", Connector{2, ep(peer, ""), ep(self, "tap1")}, nil, "", []string{"tap1"}, peer, false},
		{"collapsed", Connector{3, ep(self, "tap0"), ep(self, "tap1")}, nil, "", []string{"tap0", "tap1"}, netip.Addr{}, true},
		{"IPv4-mapped host", Connector{4, ep(netip.MustParseAddr("::ffff:192.0.2.1"), "tap0"), ep(peer, "")}, nil, "", []string{"tap0"}, peer, false},
		{"max ID", Connector{MaxID, ep(self, "tap0"), ep(peer, "")}, nil, "", []string{"tap0"}, peer, false},
		{"ID zero", Connector{0, ep(self, "tap0"), ep(peer, "")}, ErrInvalid, "out of range", nil, netip.Addr{}, false},
		{"ID beyond VNI", Connector{MaxID + 1, ep(self, "tap0"), ep(peer, "")}, ErrInvalid, "24-bit", nil, netip.Addr{}, false},
		{"missing host", Connector{5, ep(netip.Addr{}, "tap0"), ep(peer, "")}, ErrInvalid, "unicast underlay", nil, netip.Addr{}, false},
		{"multicast host", Connector{5, ep(self, "tap0"), ep(netip.MustParseAddr("239.1.1.1"), "")}, ErrInvalid, "unicast underlay", nil, netip.Addr{}, false},
		{"loopback host", Connector{5, ep(self, "tap0"), ep(netip.MustParseAddr("127.0.0.1"), "")}, ErrInvalid, "unicast underlay", nil, netip.Addr{}, false},
		{"family mismatch", Connector{5, ep(self, "tap0"), ep(netip.MustParseAddr("2001:db8::1"), "")}, ErrInvalid, "family", nil, netip.Addr{}, false},
		{"same NIC", Connector{5, ep(self, "tap0"), ep(self, "tap0")}, ErrInvalid, "same NIC", nil, netip.Addr{}, false},
		{"same remote NIC", Connector{5, ep(peer, "t"), ep(peer, "t")}, ErrInvalid, "same NIC", nil, netip.Addr{}, false},
		{"local without device", Connector{5, ep(self, ""), ep(peer, "tapx")}, ErrInvalid, "tap name", nil, netip.Addr{}, false},
		{"device name too long", Connector{5, ep(self, "a-very-long-tap-name"), ep(peer, "")}, ErrInvalid, "15", nil, netip.Addr{}, false},
		{"not on this host", Connector{5, ep(peer, "tap0"), ep(other, "tap1")}, ErrNotLocal, "Delete it here", nil, netip.Addr{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := tc.c.plan(self)
			if tc.err != nil {
				if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.hint) {
					t.Fatalf("err = %v; want %v mentioning %q", err, tc.err, tc.hint)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(p.local, ",") != strings.Join(tc.local, ",") || p.remote != tc.remote || p.collapsed() != tc.collapsed {
				t.Fatalf("plan = %+v; want local %v remote %v collapsed %v", p, tc.local, tc.remote, tc.collapsed)
			}
		})
	}
}

// TestAPIErrors checks the registry's errors against a real host.
func TestAPIErrors(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		n := newTestNet(t, b, 1500, false)
		h1 := n.addHost("h1", 1)
		a := n.addVM(h1, "vma", "tapa", macA, ipA)
		bv := n.addVM(h1, "vmb", "tapb", macB, ipB)
		peer := netip.MustParseAddr("192.168.77.2")
		ctx := t.Context()
		dp := h1.dp
		c := Connector{ID: 10, A: a.ep(), B: Endpoint{Host: peer, Device: "tapz"}}
		if err := dp.Create(ctx, c); err != nil {
			t.Fatal(err)
		}
		must := func(err, want error, hint string) {
			t.Helper()
			if !errors.Is(err, want) || !strings.Contains(err.Error(), hint) {
				t.Fatalf("err = %v; want %v mentioning %q", err, want, hint)
			}
		}
		must(dp.Create(ctx, c), ErrExists, "Update it to retarget")
		must(dp.Create(ctx, Connector{ID: 11, A: a.ep(), B: c.B}), ErrDeviceInUse, "tapa")
		must(dp.Create(ctx, Connector{ID: 12, A: Endpoint{Host: h1.addr, Device: "nosuch"}, B: c.B}), ErrUnknownDevice, "create the VM's tap")
		must(dp.Update(ctx, Connector{ID: 13, A: bv.ep(), B: c.B}), ErrNotFound, "Create it first")
		must(dp.Delete(ctx, 13), ErrNotFound, "delete connector 13")
		_, err := dp.Stats(ctx, 13)
		must(err, ErrNotFound, "stats of connector 13")
		_, err = dp.Get(ctx, 13)
		must(err, ErrNotFound, "get connector 13")
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		must(dp.Create(cancelled, Connector{ID: 14, A: bv.ep(), B: c.B}), context.Canceled, "create connector 14")

		// A failed call changed nothing: the device is still free.
		c2 := Connector{ID: 11, A: bv.ep(), B: c.B}
		if err := dp.Create(ctx, c2); err != nil {
			t.Fatal(err)
		}
		list, err := dp.List(ctx)
		if err != nil || len(list) != 2 || list[0] != c || list[1] != c2 {
			t.Fatalf("List = %+v, %v; want [%+v %+v]", list, err, c, c2)
		}
		if err := dp.Delete(ctx, 10); err != nil {
			t.Fatal(err)
		}
		// The freed device can join another connector.
		if err := dp.Create(ctx, Connector{ID: 15, A: a.ep(), B: c.B}); err != nil {
			t.Fatal(err)
		}

		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(NewCollector(dp))
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		series := 0
		for _, mf := range mfs {
			if mf.GetName() == "hostd_connector_packets_total" {
				series = len(mf.GetMetric())
			}
		}
		if series != 4 {
			t.Fatalf("exported %d packet series; want 4 (2 connectors x tx/rx)", series)
		}

		if _, err := New(ctx, Config{Backend: "dpdk", Underlay: h1.addr, Netns: h1.h}); !errors.Is(err, ErrInvalid) {
			t.Fatalf("unknown backend: err = %v", err)
		}
		if _, err := New(ctx, Config{Backend: b, Underlay: netip.MustParseAddr("192.0.2.99"), Netns: h1.h}); !errors.Is(err, ErrUnknownDevice) {
			t.Fatalf("foreign underlay address: err = %v", err)
		}
		if _, err := New(ctx, Config{Backend: b, Netns: h1.h}); !errors.Is(err, ErrInvalid) {
			t.Fatalf("no underlay address: err = %v", err)
		}
		if err := dp.Close(); err != nil {
			t.Fatal(err)
		}
		must(dp.Create(ctx, Connector{ID: 16, A: bv.ep(), B: c.B}), ErrClosed, "create connector 16")
	})
}

func TestRateLimiter(t *testing.T) {
	n := newTestNet(t, BackendNetdev, 1500, false)
	h1, h2 := n.addHost("h1", 1), n.addHost("h2", 2)
	rl, err := NewRateLimiter(h1.h, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	ctx := t.Context()
	if _, ok, err := rl.Get(ctx, "u0"); err != nil || ok {
		t.Fatalf("Get before Set = %v, %v; want no limit", ok, err)
	}
	for _, rate := range []uint64{1 << 20, 50 << 20} {
		if err := rl.Set(ctx, "u0", rate); err != nil {
			t.Fatal(err)
		}
		if got, ok, err := rl.Get(ctx, "u0"); err != nil || !ok || got != rate {
			t.Fatalf("Get = %d, %v, %v; want %d", got, ok, err, rate)
		}
	}
	// Traffic still flows through the limited device.
	out := n.run("ip", "netns", "exec", h1.ns, "tc", "-s", "qdisc", "show", "dev", "u0")
	if !strings.Contains(out, "tbf") {
		t.Fatalf("no tbf qdisc on u0:\n%s", out)
	}
	a := n.addVM(h1, "vma", "tapa", macA, ipA)
	bv := n.addVM(h2, "vmb", "tapb", macB, ipB)
	for _, h := range []*testHost{h1, h2} {
		if err := h.dp.Create(ctx, Connector{ID: 1, A: a.ep(), B: bv.ep()}); err != nil {
			t.Fatal(err)
		}
	}
	n.mustPing(a, ipB, 3, 1000)
	if err := rl.Clear(ctx, "u0"); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := rl.Get(ctx, "u0"); err != nil || ok {
		t.Fatalf("Get after Clear = %v, %v; want no limit", ok, err)
	}
	if err := rl.Clear(ctx, "u0"); err != nil {
		t.Fatalf("second Clear: %v", err)
	}
	if err := rl.Set(ctx, "u0", 0); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "use Clear") {
		t.Fatalf("rate 0: err = %v", err)
	}
	if err := rl.Set(ctx, "nosuch", 1000); !errors.Is(err, ErrUnknownDevice) {
		t.Fatalf("unknown device: err = %v", err)
	}
}
