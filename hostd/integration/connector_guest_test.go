package integration

import (
	"context"
	"testing"
	"time"

	"hostd/hostd/config"
	"hostd/hostd/connector"
	"hostd/hostd/hostdtest"
	"hostd/hostd/vm"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
	"hostd/xen"
)

// Two real TCG guests, each booted through the socket of the hostd of its
// namespace host, joined by a connector created through both sockets:
// guest A's agent probes guest B's echo server over UDP and TCP.
//
// libvirtd lives in the root namespace, so it makes each guest's tap there
// at start; the test then moves the tap into its host's namespace, where
// that host's hostd and dataplane see it. QEMU keeps working through its fd.
func TestConnectorBetweenRealGuests(t *testing.T) {
	n := newTestNet(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := func(ns, underlay string) *hostdtest.Daemon {
		return startHostd(t, hostdtest.Options{Netns: ns, Edit: func(c *config.Config) {
			c.Dataplane.Underlay, c.Dataplane.PinPath = underlay, ""
		}})
	}
	hosts := []struct {
		d        *hostdtest.Daemon
		ns, vm   string
		tap, ip  string
		underlay string
	}{
		{start(n.hostA, underlayA), n.hostA, prefix + "guest-a", "g" + n.tapA, "10.79.0.1", underlayA},
		{start(n.hostB, underlayB), n.hostB, prefix + "guest-b", "g" + n.tapB, "10.79.0.2", underlayB},
	}
	var agentA string
	for i, h := range hosts {
		tap := h.tap
		t.Cleanup(func() { _ = execIP("link", "del", tap) }) // if still in the root namespace
		v, err := h.d.Client.CreateVM(ctx, vm.Request{Name: h.vm, MemoryMiB: 160, NICs: []xen.NIC{{Tap: h.tap}},
			Cmdline: "console=ttyS0 panic=-1 hostd.ip=" + h.ip + "/24 hostd.echo=7"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.d.Client.WaitReady(ctx, h.vm); err != nil {
			t.Fatal(err)
		}
		ipCmd(t, "link", "set", h.tap, "netns", h.ns)
		ipCmd(t, "-n", h.ns, "link", "set", h.tap, "up")
		if i == 0 {
			agentA = v.Spec.AgentSocket
		}
	}
	spec := connector.Spec{ID: 4242,
		A: connector.Endpoint{Host: underlayA, VM: hosts[0].vm},
		B: connector.Endpoint{Host: underlayB, VM: hosts[1].vm}}
	for _, h := range hosts {
		if _, err := h.d.Client.CreateConnector(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
	ac, err := agentclient.Dial(ctx, agentA)
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	for _, proto := range []string{"udp", "tcp"} {
		// Up to 10 s per probe: TCG guests on two shared cores answer late,
		// and only loss is what this checks.
		r, err := ac.Probe(ctx, agentapi.ProbeArgs{Addr: hosts[1].ip + ":7", Proto: proto, Count: 20,
			IntervalMS: 10, TimeoutMS: 10000, Size: 1000})
		if err != nil {
			t.Fatalf("%s probe from guest A: %v", proto, err)
		}
		if r.Received != r.Sent || r.Sent != 20 || r.Mismatched != 0 {
			t.Fatalf("%s probe from guest A to B over the connector: %+v", proto, r)
		}
		t.Logf("%s guest-to-guest over the connector: rtt p50 %d us, max %d us", proto, r.RTTUsP50, r.RTTUsMax)
	}
	st, err := hosts[0].d.Client.ConnectorStats(ctx, spec.ID)
	if err != nil || st.TxPackets < 40 || st.RxPackets < 40 {
		t.Fatalf("connector stats on host A after 40 probes: %+v %v", st, err)
	}
}
