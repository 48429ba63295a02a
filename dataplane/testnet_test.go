package dataplane

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// testNet builds hosts and VMs out of network namespaces: hosts share an
// underlay switch (a bridge in its own namespace, veth to each host); a VM is
// a namespace whose eth0 is a veth into its host, the host end standing in
// for the VM's tap. Everything lives in namespaces the test created and is
// deleted in Cleanup, also when the test fails.
type testNet struct {
	tb      testing.TB
	id      string
	backend Backend
	mtu     int
	ipv6    bool
	sw      string
	nss     []string
}

type testHost struct {
	name string
	ns   string
	h    netns.NsHandle
	addr netip.Addr
	dp   Dataplane
}

type testVM struct {
	name string
	ns   string
	h    netns.NsHandle
	host *testHost
	tap  string // the host end
	ip   string
}

func newTestNet(tb testing.TB, backend Backend, mtu int, ipv6 bool) *testNet {
	tb.Helper()
	requireRoot(tb)
	n := &testNet{tb: tb, id: fmt.Sprintf("hdp%06x", rand.Uint32()&0xffffff), backend: backend, mtu: mtu, ipv6: ipv6}
	tb.Cleanup(func() {
		for i := len(n.nss) - 1; i >= 0; i-- {
			if out, err := exec.Command("ip", "netns", "del", n.nss[i]).CombinedOutput(); err != nil {
				tb.Logf("delete namespace %s: %v: %s", n.nss[i], err, out)
			}
		}
	})
	n.sw = n.newNS("sw")
	n.sh(n.sw, "ip link add br0 type bridge && ip link set br0 up")
	return n
}

func requireRoot(tb testing.TB) {
	tb.Helper()
	if out, err := exec.Command("ip", "netns", "add", "hdp-probe").CombinedOutput(); err != nil {
		tb.Skipf("needs root and iproute2 to create network namespaces: %v: %s", err, out)
	}
	exec.Command("ip", "netns", "del", "hdp-probe").Run()
}

func (n *testNet) newNS(name string) string {
	n.tb.Helper()
	ns := n.id + "-" + name
	n.run("ip", "netns", "add", ns)
	n.nss = append(n.nss, ns)
	n.run("ip", "-n", ns, "link", "set", "lo", "up")
	return ns
}

func (n *testNet) handle(ns string) netns.NsHandle {
	n.tb.Helper()
	h, err := netns.GetFromName(ns)
	if err != nil {
		n.tb.Fatalf("open namespace %s: %v", ns, err)
	}
	n.tb.Cleanup(func() { h.Close() })
	return h
}

func (n *testNet) run(name string, args ...string) string {
	n.tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		n.tb.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// sh runs a shell script inside namespace ns.
func (n *testNet) sh(ns, script string) string {
	n.tb.Helper()
	return n.run("ip", "netns", "exec", ns, "sh", "-ec", script)
}

// addHost creates host number i (1..250) on the underlay and opens its
// dataplane.
func (n *testNet) addHost(name string, i int) *testHost {
	n.tb.Helper()
	h := &testHost{name: name, ns: n.newNS(name)}
	h.h = n.handle(h.ns)
	n.run("ip", "link", "add", "u0", "netns", h.ns, "type", "veth", "peer", "name", "p"+name, "netns", n.sw)
	n.sh(n.sw, fmt.Sprintf("ip link set p%s mtu %d master br0 up", name, n.mtu))
	pfx := fmt.Sprintf("192.168.77.%d/24", i)
	if n.ipv6 {
		pfx = fmt.Sprintf("fd77::%d/64 nodad", i)
	}
	// On an IPv4 underlay, IPv6 goes off before u0 comes up: otherwise its
	// router solicitations and MLD reports land on the underlay counters
	// that tests read (TestCollapse counts every packet on u0).
	v6 := "sysctl -qw net.ipv6.conf.all.disable_ipv6=1\nsysctl -qw net.ipv6.conf.default.disable_ipv6=1\n"
	if n.ipv6 {
		v6 = ""
	}
	n.sh(h.ns, fmt.Sprintf(`%sip link set u0 mtu %d up
ip addr add %s dev u0`, v6, n.mtu, pfx))
	h.addr = netip.MustParsePrefix(strings.Fields(pfx)[0]).Addr()
	log := slog.New(slog.NewTextHandler(n.tb.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	dp, err := New(context.Background(), Config{Backend: n.backend, Underlay: h.addr, Netns: h.h, Logger: log})
	if err != nil {
		n.tb.Fatalf("open dataplane on %s: %v", name, err)
	}
	h.dp = dp
	n.tb.Cleanup(func() {
		if err := dp.Close(); err != nil {
			n.tb.Errorf("close dataplane on %s: %v", name, err)
		}
	})
	return h
}

// addVM creates a VM on host with address ip (a /24) and the given MAC, its
// tap named tap on the host. The guest uses the connector MTU, as a
// virtio-net guest told the MTU by the hypervisor would.
func (n *testNet) addVM(host *testHost, name, tap, mac, ip string) *testVM {
	n.tb.Helper()
	vm := &testVM{name: name, ns: n.newNS(name), host: host, tap: tap, ip: ip}
	vm.h = n.handle(vm.ns)
	n.run("ip", "link", "add", tap, "netns", host.ns, "type", "veth", "peer", "name", "eth0", "netns", vm.ns)
	n.sh(vm.ns, fmt.Sprintf(`sysctl -qw net.ipv6.conf.all.disable_ipv6=1
sysctl -qw net.ipv6.conf.default.disable_ipv6=1
sysctl -qw net.ipv4.icmp_echo_ignore_broadcasts=0
ip link set eth0 address %s mtu %d up
ip addr add %s/24 dev eth0`, mac, host.dp.MTU(), ip))
	n.sh(host.ns, "ip link set "+tap+" up")
	n.startEcho(vm, ip)
	return vm
}

func (vm *testVM) ep() Endpoint { return Endpoint{Host: vm.host.addr, Device: vm.tap} }

// echoPort is where every test VM runs a UDP echo server: the tests' ping,
// so they need no ping binary and can send full-MTU probes with DF set.
const echoPort = 7

// startEcho runs vm's UDP echo server on ip until the test ends.
func (n *testNet) startEcho(vm *testVM, ip string) {
	n.tb.Helper()
	var pc net.PacketConn
	if err := inNetns(vm.h, func() (err error) { pc, err = net.ListenPacket("udp4", fmt.Sprintf("%s:%d", ip, echoPort)); return }); err != nil {
		n.tb.Fatalf("echo server in %s: %v", vm.name, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			m, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:m], from)
		}
	}()
	n.tb.Cleanup(func() { pc.Close(); <-done })
}

// pinger sends UDP probes from a VM with the DF bit set, so a probe of the
// connector MTU either fits whole or is lost.
type pinger struct {
	conn *net.UDPConn
	dst  *net.UDPAddr
}

func (n *testNet) pinger(vm *testVM, dst string) *pinger {
	n.tb.Helper()
	var c *net.UDPConn
	err := inNetns(vm.h, func() (err error) {
		c, err = net.ListenUDP("udp4", nil)
		if err != nil {
			return err
		}
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
		}); err != nil {
			return err
		}
		return serr
	})
	if err != nil {
		n.tb.Fatalf("pinger in %s: %v", vm.name, err)
	}
	n.tb.Cleanup(func() { c.Close() })
	return &pinger{conn: c, dst: &net.UDPAddr{IP: net.ParseIP(dst), Port: echoPort}}
}

// probe sends one probe of size bytes (UDP payload) and waits at most
// timeout for its echo; it returns the round trip, or false when lost.
func (p *pinger) probe(seq uint64, size int, timeout time.Duration) (time.Duration, bool) {
	if size < 8 {
		size = 8
	}
	buf := make([]byte, size)
	binary.BigEndian.PutUint64(buf, seq)
	start := time.Now()
	if _, err := p.conn.WriteToUDP(buf, p.dst); err != nil {
		return 0, false
	}
	p.conn.SetReadDeadline(start.Add(timeout))
	in := make([]byte, 65536)
	for i := 0; i < 1000; i++ { // late echoes of earlier probes are skipped
		m, _, err := p.conn.ReadFromUDP(in)
		if err != nil {
			return 0, false
		}
		if m == size && binary.BigEndian.Uint64(in) == seq {
			return time.Since(start), true
		}
	}
	return 0, false
}

// ping sends count probes from vm to dst and returns how many were echoed.
func (n *testNet) ping(vm *testVM, dst string, count, size int, timeout time.Duration) (sent, recv int) {
	n.tb.Helper()
	p := n.pinger(vm, dst)
	for i := 0; i < count; i++ {
		if _, ok := p.probe(uint64(i), size, timeout); ok {
			recv++
		}
	}
	return count, recv
}

// mustPing asserts that every one of count probes is echoed. Each probe
// may take up to 5 s: on two shared cores a reply can be late without
// being lost, and only loss is what this checks.
func (n *testNet) mustPing(vm *testVM, dst string, count, size int) {
	n.tb.Helper()
	if _, recv := n.ping(vm, dst, count, size, 5*time.Second); recv != count {
		n.tb.Fatalf("ping %s from %s (%d bytes): %d/%d echoed", dst, vm.name, size, recv, count)
	}
}

// pingFails asserts that no probe is echoed.
func (n *testNet) pingFails(vm *testVM, dst string, count int) {
	n.tb.Helper()
	if _, recv := n.ping(vm, dst, count, 64, time.Second); recv != 0 {
		n.tb.Fatalf("ping %s from %s: %d echoed, want none", dst, vm.name, recv)
	}
}

// waitFor polls cond a bounded number of times.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("gave up waiting for %s", what)
}

func linkCounter(tb testing.TB, n *testNet, ns, dev, counter string) uint64 {
	tb.Helper()
	out := n.run("ip", "netns", "exec", ns, "cat", "/sys/class/net/"+dev+"/statistics/"+counter)
	v, err := strconv.ParseUint(strings.TrimSpace(out), 10, 64)
	if err != nil {
		tb.Fatalf("counter %s of %s: %v", counter, dev, err)
	}
	return v
}
