package dataplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
	"hostd/images/guest/guestimage"
	"hostd/xen"
	"hostd/xen/libvirt"
)

// The guest test runs real VMs on both ends of a connector: two TCG guests
// booted by libvirt, each on a tap the test makes in the root namespace
// and, once QEMU holds it, moves into the namespace of a test host. What the
// namespace-only tests emulate with veths (a guest's NIC, its MTU, its ARP,
// virtio offloads turning into GSO frames on the tap) is then the real
// thing. The guests measure the path themselves with the agent's probe
// command.

const (
	guestSubnet  = "10.231.0"
	guestEchoP   = 7
	guestBootMax = 4 * time.Minute // two TCG boots on two shared cores
	libvirtSock  = "/run/libvirt/libvirt-sock"
)

// testGuest is one libvirt domain and its agent.
type testGuest struct {
	name, tap, mac, ip string
	dir                string
	agent              *agentclient.Client
}

func (g *testGuest) echoAddr() string { return fmt.Sprintf("%s:%d", g.ip, guestEchoP) }

// guestLab is what the backend subtests share: the two guests, whose taps
// sit in the root namespace between subtests, and that namespace.
type guestLab struct {
	home netns.NsHandle // the test process's (root) namespace
	a, b *testGuest
	mtu  int // the connector MTU the guests were given (virtio-net mtu)
}

// TestGuestsOverConnector boots two guests once and, for each backend,
// joins them with a connector between two test hosts: UDP and TCP both
// ways, the MTU as the guest sees it, isolation from a second connector, and
// guest B's endpoint moving to a third host while A probes it. Then it
// measures the same probe over a plain bridge for comparison. The guests'
// taps live in the root namespace only while parked (down) between
// subtests.
func TestGuestsOverConnector(t *testing.T) {
	begin := time.Now()
	lab := newGuestLab(t)
	t.Logf("measure: two guests defined, booted and ready in %.1fs", time.Since(begin).Seconds())
	rtt := map[string]agentapi.ProbeResult{}
	forBackends(t, func(t *testing.T, b Backend) {
		start := time.Now()
		rtt[string(b)] = lab.runBackend(t, b)
		t.Logf("measure: %s subtest %.1fs", b, time.Since(start).Seconds())
	})
	if !t.Failed() {
		rtt["direct bridge"] = lab.directBaseline(t)
	}
	for _, k := range []string{string(BackendEBPF), string(BackendNetdev), "direct bridge"} {
		if r, ok := rtt[k]; ok {
			t.Logf("measure: guest A -> guest B UDP 64 B via %-13s %d probes: rtt p50 %d us, p90 %d us, max %d us",
				k, r.Received, r.RTTUsP50, r.RTTUsP90, r.RTTUsMax)
		}
	}
	t.Logf("measure: whole test %.1fs", time.Since(begin).Seconds())
}

// newGuestLab makes the taps and boots the guests, and arranges for the
// domains to be destroyed and undefined and the taps deleted when the test
// ends, pass or fail.
func newGuestLab(t *testing.T) *guestLab {
	t.Helper()
	requireRoot(t)
	if _, err := os.Stat(libvirtSock); err != nil {
		t.Skipf("needs a system libvirtd (qemu:///system): %v", err)
	}
	img := guestimage.Require(t)
	home, err := netns.GetFromPid(os.Getpid())
	if err != nil {
		t.Fatalf("open the test's own network namespace: %v", err)
	}
	t.Cleanup(func() { home.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), guestBootMax)
	defer cancel()
	hv := openLibvirt(t)
	sweepStale(t, hv, home)

	// Names carry the test process's pid, so a later run can tell the
	// leftovers of a run that died (a test binary timeout skips Cleanup)
	// from those of a run still going.
	pid := os.Getpid()
	var rnd [2]byte
	rand.Read(rnd[:])
	id := fmt.Sprintf("%d-%s", pid, hex.EncodeToString(rnd[:]))
	lab := &guestLab{home: home, mtu: innerMTU(1500, false)}
	lab.a = &testGuest{name: "t-dp-" + id + "-a", tap: fmt.Sprintf("tdpa%d", pid), mac: "52:54:00:d9:00:0a", ip: guestSubnet + ".1"}
	lab.b = &testGuest{name: "t-dp-" + id + "-b", tap: fmt.Sprintf("tdpb%d", pid), mac: "52:54:00:d9:00:0b", ip: guestSubnet + ".2"}
	guests := []*testGuest{lab.a, lab.b}
	for _, g := range guests {
		lab.makeTap(t, g.tap)
	}
	for _, g := range guests {
		lab.defineGuest(t, hv, img, g)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(guests))
	for i, g := range guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = lab.startGuest(ctx, hv, g)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return lab
}

// openLibvirt connects to the system libvirtd, retrying a few times: other
// tests restart libvirtd (its reconnect tests), and a connection made while
// it starts up can be refused features such as keepalive.
func openLibvirt(t *testing.T) *libvirt.Driver {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var err error
	for try := 0; try < 5; try++ {
		var hv *libvirt.Driver
		if hv, err = libvirt.New(ctx, libvirt.Config{URI: "qemu:///system", Accel: xen.AccelTCG}); err == nil {
			t.Cleanup(func() { hv.Close() })
			return hv
		}
		time.Sleep(2 * time.Second)
	}
	t.Fatalf("libvirtd is running (%s) but unusable after 5 tries: %v", libvirtSock, err)
	return nil
}

// staleName matches this test's domain and tap names and captures the pid
// of the run that made them.
var staleName = regexp.MustCompile(`^(?:t-dp-([0-9]+)-[0-9a-f]+-[ab]|tdp[ab]([0-9]+))$`)

// sweepStale removes the domains and root-namespace taps of earlier runs
// of this test whose process is gone: two orphaned TCG guests would keep
// burning the shared cores.
func sweepStale(t *testing.T, hv *libvirt.Driver, home netns.NsHandle) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dead := func(name string) bool {
		m := staleName.FindStringSubmatch(name)
		if m == nil {
			return false
		}
		pid, err := strconv.Atoi(m[1] + m[2])
		return err == nil && pid != os.Getpid() && !processRunning(pid)
	}
	doms, err := hv.List(ctx)
	if err != nil {
		t.Fatalf("list domains: %v", err)
	}
	for _, d := range doms {
		if !dead(d.Name) {
			continue
		}
		t.Logf("removing domain %s left by a test run that died", d.Name)
		info, _ := hv.Domain(ctx, d.Name)
		if err := hv.Destroy(ctx, d.Name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("destroy stale %s: %v", d.Name, err)
		}
		if err := hv.Undefine(ctx, d.Name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("undefine stale %s: %v", d.Name, err)
		}
		// Its directory (RAM file, logs), if it is one defineGuest made.
		if info.Spec != nil {
			dir := filepath.Dir(info.Spec.RAMPath)
			if filepath.Dir(dir) == filepath.Clean(os.TempDir()) && strings.HasPrefix(filepath.Base(dir), "tdp") {
				os.RemoveAll(dir)
			}
		}
	}
	nl, err := netlink.NewHandleAt(home)
	if err != nil {
		t.Fatalf("netlink: %v", err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		t.Fatalf("list links: %v", err)
	}
	for _, l := range links {
		if _, tap := l.(*netlink.Tuntap); tap && dead(l.Attrs().Name) {
			t.Logf("removing tap %s left by a test run that died", l.Attrs().Name)
			if err := nl.LinkDel(l); err != nil {
				t.Errorf("delete stale tap %s: %v", l.Attrs().Name, err)
			}
		}
	}
}

// processRunning says whether process pid exists and is not a zombie (a killed
// test binary whose parent has not reaped it yet is dead for our purpose).
func processRunning(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...: comm may contain spaces and parentheses.
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// makeTap creates a persistent tap in the root namespace, as hostd's
// dataplane would for a VM: single queue (a 1-vCPU guest; libvirt's
// TUNSETIFF must match the multiqueue flag), no packet information, with
// virtio-net headers, which is what libvirt asks for when it attaches QEMU to
// an existing tap (<interface type='ethernet'>, managed='no'). It is
// deleted when the test ends, wherever it is then: in a test namespace it
// goes with the namespace.
func (lab *guestLab) makeTap(t *testing.T, name string) {
	t.Helper()
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR}
	// The TUNSETIFF ioctl acts on the calling thread's namespace.
	if err := inNetns(lab.home, func() error { return netlink.LinkAdd(tap) }); err != nil {
		t.Fatalf("create tap %s: %v", name, err)
	}
	t.Cleanup(func() {
		nl, err := netlink.NewHandleAt(lab.home)
		if err != nil {
			t.Errorf("delete tap %s: %v", name, err)
			return
		}
		defer nl.Close()
		if l, err := nl.LinkByName(name); err == nil {
			if err := nl.LinkDel(l); err != nil {
				t.Errorf("delete tap %s: %v", name, err)
			}
		}
	})
}

// defineGuest defines g's domain on its tap, with the kernel options that
// give eth0 its address and start the echo server, and the connector MTU
// for the guest's side of the NIC. The domain is destroyed and undefined
// when the test ends.
func (lab *guestLab) defineGuest(t *testing.T, hv *libvirt.Driver, img guestimage.Image, g *testGuest) {
	t.Helper()
	// Unix socket paths are short; t.TempDir's can be too long.
	dir, err := os.MkdirTemp("", "tdp")
	if err != nil {
		t.Fatal(err)
	}
	g.dir = dir
	t.Cleanup(func() { os.RemoveAll(dir) })
	spec := xen.DomainSpec{
		Name: g.name, VCPUs: 1, MemoryMiB: 256,
		Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline:     fmt.Sprintf("console=ttyS0 quiet panic=-1 hostd.ip=%s/24 hostd.echo=%d", g.ip, guestEchoP),
		NICs:        []xen.NIC{{Tap: g.tap, MAC: g.mac, MTU: lab.mtu}},
		RAMPath:     filepath.Join(dir, "ram"),
		SerialLog:   filepath.Join(dir, "serial.log"),
		AgentSocket: filepath.Join(dir, "agent.sock"),
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := hv.Define(ctx, spec); err != nil {
		t.Fatalf("define %s: %v", g.name, err)
	}
	t.Cleanup(func() {
		if g.agent != nil {
			g.agent.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := hv.Destroy(ctx, g.name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("cleanup: destroy %s: %v", g.name, err)
		}
		if err := hv.Undefine(ctx, g.name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("cleanup: undefine %s: %v", g.name, err)
		}
		if t.Failed() {
			b, _ := os.ReadFile(spec.SerialLog)
			t.Logf("serial log of %s:\n%s", g.name, lastLines(string(b), 40))
		}
	})
}

// startGuest boots g and connects to its agent once it is ready.
func (lab *guestLab) startGuest(ctx context.Context, hv *libvirt.Driver, g *testGuest) error {
	if err := hv.Start(ctx, g.name); err != nil {
		return fmt.Errorf("start %s: %w", g.name, err)
	}
	ready, err := agentclient.WaitReady(ctx, filepath.Join(g.dir, "serial.log"))
	if err != nil {
		return fmt.Errorf("guest %s: %w", g.name, err)
	}
	if ready.Fields["ip"] != g.ip+"/24" || ready.Fields["boot_errors"] != "0" {
		return fmt.Errorf("guest %s: ready line %v: want ip %s/24 and no boot errors", g.name, ready.Fields, g.ip)
	}
	if g.agent, err = agentclient.Dial(ctx, filepath.Join(g.dir, "agent.sock")); err != nil {
		return fmt.Errorf("guest %s: %w", g.name, err)
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// checkParked asserts that the guests' taps are in the root namespace and
// down: libvirt leaves a tap it did not make (managed='no') as it found it,
// and a move takes a link down, so no guest frame ever reaches the root
// namespace's stack.
func (lab *guestLab) checkParked(t *testing.T) {
	t.Helper()
	nl, err := netlink.NewHandleAt(lab.home)
	if err != nil {
		t.Fatalf("netlink: %v", err)
	}
	defer nl.Close()
	for _, g := range []*testGuest{lab.a, lab.b} {
		l, err := nl.LinkByName(g.tap)
		if err != nil {
			t.Fatalf("tap %s of %s is not parked in the root namespace: %v", g.tap, g.name, err)
		}
		if l.Attrs().Flags&net.FlagUp != 0 {
			t.Fatalf("tap %s of %s is up in the root namespace; guest frames would reach its stack", g.tap, g.name)
		}
	}
}

// moveTap moves a tap between namespaces. The tap keeps its QEMU: the
// guest's NIC is the open file QEMU holds, not the name or the namespace.
// The move takes the link down; whoever adopts it brings it up.
func moveTap(name string, from, to netns.NsHandle) error {
	nl, err := netlink.NewHandleAt(from)
	if err != nil {
		return fmt.Errorf("move tap %s: %w", name, err)
	}
	defer nl.Close()
	l, err := nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("move tap %s: %w", name, err)
	}
	if err := nl.LinkSetNsFd(l, int(to)); err != nil {
		return fmt.Errorf("move tap %s: %w", name, err)
	}
	return nil
}

// lend arranges for the guests' taps, which a subtest moves into its
// namespaces, to come back to the root namespace before those namespaces are
// deleted (which would delete the taps). The subtest's dataplanes are closed
// first, while their taps are still where they attached them; their own
// cleanup's Close is then a no-op.
func (lab *guestLab) lend(t *testing.T, hosts ...*testHost) {
	t.Helper()
	t.Cleanup(func() {
		for _, h := range hosts {
			if h.dp == nil {
				continue
			}
			if err := h.dp.Close(); err != nil {
				t.Errorf("close dataplane on %s: %v", h.name, err)
			}
		}
		for _, g := range []*testGuest{lab.a, lab.b} {
			back := false
			for _, h := range hosts {
				if moveTap(g.tap, h.h, lab.home) == nil {
					back = true
					break
				}
			}
			if !back {
				t.Errorf("tap %s of %s is in none of this subtest's namespaces; later subtests lose the guest", g.tap, g.name)
			}
		}
	})
}

// probeAddr has guest from probe an echo server at addr ("ip:port").
func probeAddr(t *testing.T, from *testGuest, addr, proto string, count, size, intervalMS, timeoutMS int) agentapi.ProbeResult {
	t.Helper()
	args := agentapi.ProbeArgs{Addr: addr, Proto: proto, Count: uint32(count), Size: uint32(size),
		IntervalMS: uint32(intervalMS), TimeoutMS: uint32(timeoutMS)}
	ctx, cancel := context.WithTimeout(context.Background(),
		time.Duration(count*(intervalMS+timeoutMS))*time.Millisecond+time.Minute)
	defer cancel()
	r, err := from.agent.Probe(ctx, args)
	if err != nil {
		t.Fatalf("probe %s %s from %s: %v", proto, addr, from.name, err)
	}
	return r
}

// mustProbe asserts that every probe was answered unchanged. A TCG guest
// answers in milliseconds; the timeout is generous because other tests
// share the host's two cores.
func mustProbe(t *testing.T, from, to *testGuest, proto string, count, size int) agentapi.ProbeResult {
	t.Helper()
	r := probeAddr(t, from, to.echoAddr(), proto, count, size, 5, 1500)
	if r.Received != uint32(count) || r.Mismatched != 0 {
		t.Fatalf("%s probes of %d bytes from %s to %s: %d/%d answered, %d mismatched (last error %q)",
			proto, size, from.ip, to.ip, r.Received, r.Sent, r.Mismatched, r.LastError)
	}
	return r
}

// runBackend is one backend's subtest: hosts h1, h2 and h3 on an underlay,
// guest A's tap on h1 and guest B's on h2, joined by connector 100. It
// returns a small-probe RTT sample through the connector.
func (lab *guestLab) runBackend(t *testing.T, b Backend) agentapi.ProbeResult {
	n := newTestNet(t, b, 1500, false)
	h1, h2, h3 := n.addHost("h1", 1), n.addHost("h2", 2), n.addHost("h3", 3)
	lab.lend(t, h1, h2, h3)
	if h1.dp.MTU() != lab.mtu {
		t.Fatalf("connector MTU %d, but the guests were given %d", h1.dp.MTU(), lab.mtu)
	}
	a, bg := lab.a, lab.b
	lab.checkParked(t)
	if err := moveTap(a.tap, lab.home, h1.h); err != nil {
		t.Fatal(err)
	}
	if err := moveTap(bg.tap, lab.home, h2.h); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	c := Connector{ID: 100, A: Endpoint{Host: h1.addr, Device: a.tap}, B: Endpoint{Host: h2.addr, Device: bg.tap}}
	for _, h := range []*testHost{h1, h2} {
		if err := h.dp.Create(ctx, c); err != nil {
			t.Fatalf("create on %s: %v", h.name, err)
		}
	}

	// Connectivity both ways, UDP and TCP; the TCP probe of 256 KiB makes
	// the guest's virtio-net hand the tap large (GSO) segments.
	mustProbe(t, a, bg, "udp", 20, 64)
	mustProbe(t, bg, a, "udp", 5, 64)
	mustProbe(t, a, bg, "tcp", 20, 1000)
	big := mustProbe(t, a, bg, "tcp", 3, 256<<10)
	t.Logf("%s: TCP 256 KiB echo through the connector: p50 %d us", b, big.RTTUsP50)
	for _, h := range []*testHost{h1, h2} {
		s, err := h.dp.Stats(ctx, c.ID)
		if err != nil {
			t.Fatal(err)
		}
		if s.TxPackets < 25 || s.RxPackets < 25 {
			t.Errorf("%s stats %+v: want at least the 25 UDP probes each way", h.name, s)
		}
	}

	// The MTU: the guest's stack sees the connector MTU on eth0 (virtio-net
	// mtu from the NIC spec), and a datagram filling it crosses whole; one
	// larger, fragmented by the guest (DF not required), crosses too.
	full := mustProbe(t, a, bg, "udp", 5, h1.dp.MTU()-28)
	if full.PathMTU != h1.dp.MTU() {
		t.Errorf("guest A's path MTU to B is %d, the connector's %d", full.PathMTU, h1.dp.MTU())
	}
	if full := mustProbe(t, bg, a, "udp", 5, h1.dp.MTU()-28); full.PathMTU != h1.dp.MTU() {
		t.Errorf("guest B's path MTU to A is %d, the connector's %d", full.PathMTU, h1.dp.MTU())
	}
	mustProbe(t, a, bg, "udp", 3, 3*h1.dp.MTU())

	sample := mustProbe(t, a, bg, "udp", 150, 64)

	lab.checkIsolation(t, n, h1, h2, c)
	lab.retarget(t, h1, h2, h3, c)
	return sample
}

// checkIsolation: a second connector (101) between two namespace VMs that
// reuse the guests' IP addresses never sees a frame of guest A or B, while
// A talks to B and broadcasts ARP for an address nobody has.
func (lab *guestLab) checkIsolation(t *testing.T, n *testNet, h1, h2 *testHost, c Connector) {
	vc := n.addVM(h1, "vc", "tdpc", "02:00:00:00:01:0c", lab.a.ip)
	vd := n.addVM(h2, "vd", "tdpd", "02:00:00:00:01:0d", lab.b.ip)
	other := Connector{ID: 101, A: vc.ep(), B: vd.ep()}
	for _, h := range []*testHost{h1, h2} {
		if err := h.dp.Create(t.Context(), other); err != nil {
			t.Fatalf("create connector 101 on %s: %v", h.name, err)
		}
	}
	n.mustPing(vc, lab.b.ip, 3, 64) // the second connector works
	rc, rd := n.rawSocket(vc), n.rawSocket(vd)
	before, err := h2.dp.Stats(t.Context(), c.ID)
	if err != nil {
		t.Fatal(err)
	}
	mustProbe(t, lab.a, lab.b, "udp", 10, 64)
	lost := probeAddr(t, lab.a, guestSubnet+".99:7", "udp", 3, 64, 0, 300)
	if lost.Received != 0 {
		t.Fatalf("a probe to an address nobody has was answered: %+v", lost)
	}
	after, err := h2.dp.Stats(t.Context(), c.ID)
	if err != nil {
		t.Fatal(err)
	}
	if after.RxPackets < before.RxPackets+10 {
		t.Fatalf("connector 100 delivered %d frames to B during the probes, want at least 10", after.RxPackets-before.RxPackets)
	}
	guestMACs := map[string]bool{lab.a.mac: true, lab.b.mac: true}
	for _, s := range []struct {
		name string
		r    *rawSock
	}{{"vc", rc}, {"vd", rd}} {
		// The socket has queued everything since it was opened; read it
		// until it stays empty (bounded in frames and timeouts).
		seen := 0
		for i, idle := 0, 0; i < 2000 && idle < 5; i++ {
			f := s.r.recv()
			if f == nil {
				idle++
				continue
			}
			seen++
			if len(f) >= 12 && guestMACs[net.HardwareAddr(f[6:12]).String()] {
				t.Fatalf("%s on connector 101 received a frame from guest %s: % x", s.name, net.HardwareAddr(f[6:12]), f[:min(len(f), 64)])
			}
		}
		t.Logf("%s on connector 101: %d frames seen during A's probes, none from the guests", s.name, seen)
	}
	// The captures work: a frame on connector 101 does arrive.
	sentinel := frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:01:0d", []uint16{etherExp}, "connector 101 sentinel")
	rd.send(sentinel)
	rc.await("sentinel on connector 101", sentinel)
}

// retarget moves guest B's endpoint from h2 to h3 while A probes it: B's
// tap (with the running guest behind it) moves namespaces, h2 deletes the
// connector, h3 creates it and h1 updates it, as a migration would. B keeps
// its MAC and IP, so A needs no ARP.
func (lab *guestLab) retarget(t *testing.T, h1, h2, h3 *testHost, c Connector) {
	ctx := t.Context()
	tx := func() uint64 {
		s, err := h1.dp.Stats(ctx, c.ID)
		if err != nil {
			t.Fatal(err)
		}
		return s.TxPackets
	}
	type result struct {
		r   agentapi.ProbeResult
		err error
	}
	done := make(chan result, 1)
	start := tx()
	go func() {
		pctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		r, err := lab.a.agent.Probe(pctx, agentapi.ProbeArgs{Addr: lab.b.echoAddr(), Proto: "udp",
			Count: 300, IntervalMS: 10, TimeoutMS: 200, Size: 64})
		done <- result{r, err}
	}()
	waitUntil(t, "guest A's probe stream through h1", time.Minute, func() bool { return tx() >= start+20 })

	if err := h2.dp.Delete(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if err := moveTap(lab.b.tap, h2.h, h3.h); err != nil {
		t.Fatal(err)
	}
	moved := Connector{ID: c.ID, A: c.A, B: Endpoint{Host: h3.addr, Device: lab.b.tap}}
	if err := h3.dp.Create(ctx, moved); err != nil {
		t.Fatal(err)
	}
	if err := h1.dp.Update(ctx, moved); err != nil {
		t.Fatal(err)
	}
	movedAt := tx()
	var res result
	select {
	case res = <-done:
	case <-time.After(3 * time.Minute):
		t.Fatal("guest A's probe across the move did not return")
	}
	if res.err != nil {
		t.Fatal(res.err)
	}
	r := res.r
	t.Logf("probe stream across the move: %d sent, %d answered, %d lost; h1 had sent %d of them when the move was done",
		r.Sent, r.Received, r.Lost, movedAt-start)
	if r.Received == 0 {
		t.Fatalf("no probe answered across the move: %+v", r)
	}
	mustProbe(t, lab.a, lab.b, "udp", 10, 64)
	mustProbe(t, lab.b, lab.a, "tcp", 5, 1000)
	s3, err := h3.dp.Stats(ctx, c.ID)
	if err != nil {
		t.Fatal(err)
	}
	if s3.RxPackets < 15 || s3.TxPackets < 15 {
		t.Fatalf("h3 stats %+v: want the probes after the move through h3", s3)
	}
}

// waitUntil polls cond every 20ms, at most timeout.
func waitUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for i := 0; i < int(timeout/(20*time.Millisecond))+1; i++ {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("gave up waiting %s for %s", timeout, what)
}

// directBaseline joins the two guests' taps with a plain bridge in one
// namespace, no connector, and measures the same probe: what the connector
// adds to a guest-to-guest round trip.
func (lab *guestLab) directBaseline(t *testing.T) agentapi.ProbeResult {
	// Only the switch namespace (with its bridge) of a test network is
	// used; a host without a dataplane stands for it in lend.
	n := newTestNet(t, BackendNetdev, 1500, false)
	sw := &testHost{name: "direct", ns: n.sw, h: n.handle(n.sw)}
	lab.lend(t, sw)
	lab.checkParked(t)
	for _, g := range []*testGuest{lab.a, lab.b} {
		if err := moveTap(g.tap, lab.home, sw.h); err != nil {
			t.Fatal(err)
		}
		n.sh(n.sw, fmt.Sprintf("ip link set %s mtu %d master br0 up", g.tap, lab.mtu))
	}
	mustProbe(t, lab.a, lab.b, "udp", 5, 64)
	return mustProbe(t, lab.a, lab.b, "udp", 150, 64)
}
