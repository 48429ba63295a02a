package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/connector"
	"hostd/hostd/hostdtest"
	"hostd/hostd/vm"
	"hostd/xen"
)

// testNet is two stand-in hosts (network namespaces joined by a veth
// underlay) and behind each a stand-in guest (a namespace whose veth peer
// plays the VM's tap on the host). Everything is created by the test and
// deleted at its end; traffic stays inside these namespaces.
type testNet struct {
	hostA, hostB, guestA, guestB string // namespace names
	tapA, tapB                   string // "taps" in hostA, hostB
}

const (
	underlayA, underlayB = "10.77.0.1", "10.77.0.2"
	guestIPA, guestIPB   = "10.78.0.1", "10.78.0.2"
)

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func newTestNet(t *testing.T) testNet {
	t.Helper()
	b := make([]byte, 3)
	rand.Read(b)
	sfx := hex.EncodeToString(b)
	n := testNet{hostA: "hdhA" + sfx, hostB: "hdhB" + sfx, guestA: "hdgA" + sfx, guestB: "hdgB" + sfx,
		tapA: "tA" + sfx, tapB: "tB" + sfx}
	for _, ns := range []string{n.hostA, n.hostB, n.guestA, n.guestB} {
		ipCmd(t, "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		ipCmd(t, "-n", ns, "link", "set", "lo", "up")
	}
	// Underlay between the hosts.
	ipCmd(t, "link", "add", "uA"+sfx, "netns", n.hostA, "type", "veth", "peer", "name", "uB"+sfx, "netns", n.hostB)
	ipCmd(t, "-n", n.hostA, "addr", "add", underlayA+"/24", "dev", "uA"+sfx)
	ipCmd(t, "-n", n.hostB, "addr", "add", underlayB+"/24", "dev", "uB"+sfx)
	ipCmd(t, "-n", n.hostA, "link", "set", "uA"+sfx, "up")
	ipCmd(t, "-n", n.hostB, "link", "set", "uB"+sfx, "up")
	// Each guest's NIC, its other end being the "tap" on its host.
	for _, g := range []struct{ host, guest, tap, ip string }{
		{n.hostA, n.guestA, n.tapA, guestIPA}, {n.hostB, n.guestB, n.tapB, guestIPB}} {
		ipCmd(t, "link", "add", g.tap, "netns", g.host, "type", "veth", "peer", "name", "eth0", "netns", g.guest)
		ipCmd(t, "-n", g.host, "link", "set", g.tap, "up")
		ipCmd(t, "-n", g.guest, "addr", "add", g.ip+"/24", "dev", "eth0")
		ipCmd(t, "-n", g.guest, "link", "set", "eth0", "up")
	}
	return n
}

// ping sends a bounded number of echo requests from a stand-in guest.
func ping(ns, addr string) (string, error) {
	out, err := exec.Command("ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-W", "2", addr).CombinedOutput()
	return string(out), err
}

// Connectors driven through two daemons' sockets, each hostd in its own
// stand-in host, on both backends: the guests reach each other only once
// both ends are configured, errors are clear, counters move, hostctl works.
func TestConnectorsThroughTheSocket(t *testing.T) {
	if _, err := exec.LookPath("busybox"); err != nil {
		t.Skip("busybox (ping) missing: apt-get install busybox-static")
	}
	for _, backend := range []string{"ebpf", "netdev"} {
		t.Run(backend, func(t *testing.T) { testConnectors(t, backend) })
	}
}

func testConnectors(t *testing.T, backend string) {
	n := newTestNet(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := func(ns, underlay string) *hostdtest.Daemon {
		return startHostd(t, hostdtest.Options{Netns: ns, Edit: func(c *config.Config) {
			c.Dataplane.Underlay, c.Dataplane.Backend, c.Dataplane.PinPath = underlay, backend, ""
		}})
	}
	a, b := start(n.hostA, underlayA), start(n.hostB, underlayB)

	h, err := a.Client.Host(ctx)
	if err != nil || h.Dataplane == nil || h.Dataplane.MTU != 1450 || h.Dataplane.Backend != backend {
		t.Fatalf("GET /v1/host dataplane: %+v %v (want %s, MTU 1500-50)", h.Dataplane, err, backend)
	}
	// The VMs are defined, not booted: their NICs are the stand-in taps.
	vmA, vmB := prefix+"conn-a-"+backend, prefix+"conn-b-"+backend
	for _, x := range []struct {
		d        *hostdtest.Daemon
		name, tp string
	}{{a, vmA, n.tapA}, {b, vmB, n.tapB}} {
		v, err := x.d.Client.CreateVM(ctx, vm.Request{Name: x.name, MemoryMiB: 64, Start: ptr(false), NICs: []xen.NIC{{Tap: x.tp}}})
		if err != nil {
			t.Fatal(err)
		}
		if v.Spec.NICs[0].MTU != 1450 {
			t.Fatalf("VM NIC MTU %d, want the connector MTU 1450", v.Spec.NICs[0].MTU)
		}
	}
	spec := connector.Spec{ID: 77,
		A: connector.Endpoint{Host: underlayA, VM: vmA, NIC: 0},
		B: connector.Endpoint{Host: underlayB, VM: vmB, NIC: 0}}

	// Bad specs: clear 4xx, nothing configured.
	bad := []struct {
		name   string
		spec   connector.Spec
		status int
		words  string
	}{
		{"unknown VM", connector.Spec{ID: 78, A: connector.Endpoint{Host: underlayA, VM: prefix + "ghost"}, B: spec.B}, 400, "no such VM"},
		{"unknown NIC", connector.Spec{ID: 78, A: connector.Endpoint{Host: underlayA, VM: vmA, NIC: 3}, B: spec.B}, 400, "has no NIC 3"},
		{"same NIC twice", connector.Spec{ID: 78, A: spec.A, B: spec.A}, 400, "same NIC"},
		{"bad address", connector.Spec{ID: 78, A: connector.Endpoint{Host: "10.77.0.300", VM: vmA}, B: spec.B}, 400, "not an IP address"},
		{"ID out of range", connector.Spec{ID: 1 << 24, A: spec.A, B: spec.B}, 400, "out of range"},
		{"not this host", connector.Spec{ID: 78, A: connector.Endpoint{Host: "10.77.0.9"}, B: spec.B}, 400, "neither"},
	}
	for _, c := range bad {
		_, err := a.Client.CreateConnector(ctx, c.spec)
		var ce *client.Error
		if !asClientErr(err, &ce) || ce.Status != c.status || !strings.Contains(ce.Message, c.words) {
			t.Errorf("%s: %v, want HTTP %d mentioning %q", c.name, err, c.status, c.words)
		}
	}

	if out, err := ping(n.guestA, guestIPB); err == nil {
		t.Fatalf("guests reach each other before any connector:\n%s", out)
	}
	rec, err := a.Client.CreateConnector(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Dataplane.A.Device != n.tapA || rec.MTU != 1450 || rec.Collapsed {
		t.Fatalf("connector on A: %+v", rec)
	}
	if _, err := a.Client.CreateConnector(ctx, spec); !client.IsStatus(err, http.StatusConflict) {
		t.Fatalf("duplicate connector: %v, want 409", err)
	}
	if out, err := ping(n.guestA, guestIPB); err == nil {
		t.Fatalf("guests reach each other with only one end configured:\n%s", out)
	}
	if _, err := b.Client.CreateConnector(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if out, err := ping(n.guestA, guestIPB); err != nil {
		t.Fatalf("ping across the connector: %v\n%s", err, out)
	}
	st, err := a.Client.ConnectorStats(ctx, 77)
	if err != nil || st.TxPackets < 3 || st.RxPackets < 3 {
		t.Fatalf("stats on A after 3 pings: %+v %v", st, err)
	}
	// Retarget to the same endpoints through PUT: the link keeps working.
	if _, err := a.Client.RetargetConnector(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if out, err := ping(n.guestA, guestIPB); err != nil {
		t.Fatalf("ping after retarget: %v\n%s", err, out)
	}
	// The CLI sees it too.
	out, err := exec.Command(filepath.Join(binDir, "hostctl"), "-socket", a.Config.API.Socket, "connector", "list").CombinedOutput()
	if err != nil || !strings.Contains(string(out), n.tapA) {
		t.Fatalf("hostctl connector list: %v\n%s", err, out)
	}
	// A restart keeps the connector (from the store, or the pinned maps).
	a.Restart()
	if out, err := ping(n.guestA, guestIPB); err != nil {
		t.Fatalf("ping after hostd restart: %v\n%s", err, out)
	}
	if err := a.Client.DeleteConnector(ctx, 77); err != nil {
		t.Fatal(err)
	}
	if out, err := ping(n.guestA, guestIPB); err == nil {
		t.Fatalf("guests still reach each other after delete on A:\n%s", out)
	}
	if _, err := a.Client.Connector(ctx, 77); !client.IsStatus(err, http.StatusNotFound) {
		t.Fatalf("deleted connector: %v, want 404", err)
	}
}

func execIP(args ...string) error { return exec.Command("ip", args...).Run() }
