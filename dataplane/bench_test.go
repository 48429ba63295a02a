package dataplane

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// The benchmarks measure once per run (go test -bench . -benchtime 1x) and
// print `bench: NAME VALUE UNIT` lines; every ratio is against a baseline
// measured in the same run between the same namespaces.

func benchLine(name string, v float64, unit string) { fmt.Printf("bench: %s %.4g %s\n", name, v, unit) }

// iperf returns TCP throughput in bit/s from client to server's dst with
// iperf3 (apt-get install iperf3).
func (n *testNet) iperf(client, server *testVM, dst string) float64 {
	n.tb.Helper()
	srv := exec.Command("ip", "netns", "exec", server.ns, "iperf3", "-s", "-1", "-B", dst, "-p", "5201")
	if err := srv.Start(); err != nil {
		n.tb.Fatalf("iperf3 server: %v (install iperf3)", err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	var r struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	var out []byte
	for i := 0; i < 20; i++ { // the server takes a moment to listen
		var err error
		ctx, cancel := context.WithTimeout(n.tb.Context(), 30*time.Second)
		out, err = exec.CommandContext(ctx, "ip", "netns", "exec", client.ns, "iperf3", "-c", dst, "-p", "5201", "-t", "2", "-J").Output()
		cancel()
		r.Error = ""
		if jerr := json.Unmarshal(out, &r); jerr != nil && err == nil {
			err = jerr
		}
		if err == nil && r.Error == "" && r.End.SumReceived.BitsPerSecond > 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r.End.SumReceived.BitsPerSecond == 0 {
		n.tb.Fatalf("iperf3 client to %s: %s", dst, out)
	}
	return r.End.SumReceived.BitsPerSecond
}

// latency returns the median UDP round trip from vm to dst.
func (n *testNet) latency(vm *testVM, dst string) time.Duration {
	n.tb.Helper()
	p := n.pinger(vm, dst)
	var rtts []time.Duration
	for i := 0; i < 2050; i++ {
		rtt, ok := p.probe(uint64(i), 64, time.Second)
		if ok && i >= 50 { // the first probes warm caches and neighbours
			rtts = append(rtts, rtt)
		}
	}
	if len(rtts) < 1000 {
		n.tb.Fatalf("latency to %s: only %d echoes", dst, len(rtts))
	}
	slices.Sort(rtts)
	return rtts[len(rtts)/2]
}

// directVeth joins a and b with a plain veth pair (the baseline) with
// addresses 10.9.0.1/.2 and the connector MTU.
func (n *testNet) directVeth(a, b *testVM, mtu int) (string, string) {
	n.run("ip", "link", "add", "d0", "netns", a.ns, "type", "veth", "peer", "name", "d0", "netns", b.ns)
	n.sh(a.ns, fmt.Sprintf("ip link set d0 mtu %d up && ip addr add 10.9.0.1/24 dev d0", mtu))
	n.sh(b.ns, fmt.Sprintf("ip link set d0 mtu %d up && ip addr add 10.9.0.2/24 dev d0", mtu))
	n.startEcho(b, "10.9.0.2")
	return "10.9.0.1", "10.9.0.2"
}

// socatTunnel joins a and b with a user-space L2 tunnel over the same
// underlay: socat moves frames between a tap and a UDP socket on each host,
// and a bridge joins the tap to a veth into the VM. Addresses 10.7.0.1/.2.
func (n *testNet) socatTunnel(ha, hb *testHost, a, b *testVM, mtu int) string {
	n.tb.Helper()
	for i, side := range []struct {
		h     *testHost
		vm    *testVM
		local netip.Addr
		peer  netip.Addr
	}{{ha, a, ha.addr, hb.addr}, {hb, b, hb.addr, ha.addr}} {
		cmd := exec.Command("ip", "netns", "exec", side.h.ns, "socat", "-b", "65536",
			fmt.Sprintf("UDP-DATAGRAM:%s:9001,bind=%s:9001", side.peer, side.local),
			"TUN,tun-type=tap,tun-name=uttap,iff-up")
		if err := cmd.Start(); err != nil {
			n.tb.Fatalf("socat: %v (install socat)", err)
		}
		n.tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		waitFor(n.tb, "socat's tap", func() bool {
			return exec.Command("ip", "-n", side.h.ns, "link", "show", "uttap").Run() == nil
		})
		n.run("ip", "link", "add", "ut"+side.vm.name, "netns", side.h.ns, "type", "veth", "peer", "name", "ut0", "netns", side.vm.ns)
		n.sh(side.h.ns, fmt.Sprintf(`ip link add brut type bridge
ip link set brut up
ip link set uttap mtu %[1]d master brut up
ip link set ut%[2]s mtu %[1]d master brut up`, mtu, side.vm.name))
		n.sh(side.vm.ns, fmt.Sprintf("ip link set ut0 mtu %d up && ip addr add 10.7.0.%d/24 dev ut0", mtu, i+1))
	}
	n.startEcho(b, "10.7.0.2")
	return "10.7.0.2"
}

// compare measures baseline and subject alternately, rounds times each, and
// returns the medians, so that drift during the run hits both alike.
func compare(rounds int, baseline, subject func() float64) (float64, float64) {
	var bs, ss []float64
	for range rounds {
		bs = append(bs, baseline())
		ss = append(ss, subject())
	}
	slices.Sort(bs)
	slices.Sort(ss)
	return bs[len(bs)/2], ss[len(ss)/2]
}

func BenchmarkThroughputLatency(b *testing.B) {
	const rounds = 5
	for range b.N {
		n, h1, h2, a, bv := twoHosts(b, BackendEBPF, 1500, false)
		_, vethB := n.directVeth(a, bv, h1.dp.MTU())
		utB := n.socatTunnel(h1, h2, a, bv, h1.dp.MTU())
		tput := func(dst string) func() float64 { return func() float64 { return n.iperf(a, bv, dst) } }
		lat := func(dst string) func() float64 { return func() float64 { return float64(n.latency(a, dst)) } }
		vethTput, connTput := compare(rounds, tput(vethB), tput(ipB))
		vethLat, connLat := compare(rounds, lat(vethB), lat(ipB))
		utTput, _ := compare(1, tput(utB), func() float64 { return 0 })
		utLat, _ := compare(1, lat(utB), func() float64 { return 0 })

		nn, nh1, _, na, nb := twoHosts(b, BackendNetdev, 1500, false)
		_, nvethB := nn.directVeth(na, nb, nh1.dp.MTU())
		ntput := func(dst string) func() float64 { return func() float64 { return nn.iperf(na, nb, dst) } }
		nlat := func(dst string) func() float64 { return func() float64 { return float64(nn.latency(na, dst)) } }
		nvethTput, netdevTput := compare(rounds, ntput(nvethB), ntput(ipB))
		nvethLat, netdevLat := compare(rounds, nlat(nvethB), nlat(ipB))

		benchLine("veth_throughput", vethTput/1e9, "Gbit/s")
		benchLine("connector_throughput", connTput/1e9, "Gbit/s")
		benchLine("connector_vs_veth_throughput", connTput/vethTput, "ratio")
		benchLine("veth_latency", vethLat/1e3, "us")
		benchLine("connector_latency", connLat/1e3, "us")
		benchLine("connector_vs_veth_latency", connLat/vethLat, "ratio")
		benchLine("netdev_throughput", netdevTput/1e9, "Gbit/s")
		benchLine("netdev_vs_veth_throughput", netdevTput/nvethTput, "ratio")
		benchLine("netdev_vs_veth_latency", netdevLat/nvethLat, "ratio")
		benchLine("userspace_tunnel_throughput", utTput/1e9, "Gbit/s")
		benchLine("connector_vs_userspace_tunnel", connTput/utTput, "ratio")
		benchLine("connector_vs_userspace_tunnel_latency", connLat/utLat, "ratio")
	}
}

// BenchmarkRetarget times moving endpoint B between h2 and h3 as the
// scheduler drives it: Update on A's host, Create on the new host, Delete
// on the old one.
func BenchmarkRetarget(b *testing.B) {
	for range b.N {
		for _, backend := range backends {
			n := newTestNet(b, backend, 1500, false)
			h1, h2, h3 := n.addHost("h1", 1), n.addHost("h2", 2), n.addHost("h3", 3)
			a := n.addVM(h1, "vma", "tapa", macA, ipA)
			vms := map[*testHost]*testVM{h2: n.addVM(h2, "vmb", "tapb", macB, ipB), h3: n.addVM(h3, "vmb2", "tapb", macB, ipB)}
			ctx := b.Context()
			c := Connector{ID: 3, A: a.ep(), B: vms[h2].ep()}
			for _, h := range []*testHost{h1, h2} {
				if err := h.dp.Create(ctx, c); err != nil {
					b.Fatal(err)
				}
			}
			const moves = 20
			var total time.Duration
			from, to := h2, h3
			for i := 0; i < moves; i++ {
				c.B = vms[to].ep()
				start := time.Now()
				if err := h1.dp.Update(ctx, c); err != nil {
					b.Fatal(err)
				}
				if err := to.dp.Create(ctx, c); err != nil {
					b.Fatal(err)
				}
				if err := from.dp.Delete(ctx, c.ID); err != nil {
					b.Fatal(err)
				}
				total += time.Since(start)
				n.mustPing(a, ipB, 1, 64) // and it works
				from, to = to, from
			}
			name := "retarget_ms"
			if backend != BackendEBPF {
				name = "retarget_ms_" + string(backend)
			}
			benchLine(name, float64(total.Microseconds())/1000/moves, "ms")
		}
	}
}

func BenchmarkSetup1000(b *testing.B) {
	for range b.N {
		for _, backend := range backends {
			n := newTestNet(b, backend, 1500, false)
			h1 := n.addHost("h1", 1)
			nl, err := netlink.NewHandleAt(h1.h)
			if err != nil {
				b.Fatal(err)
			}
			// Stand-ins for 1000 VM taps: veth pairs inside the host.
			for i := 0; i < 1000; i++ {
				v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("tap%d", i)}, PeerName: fmt.Sprintf("vm%d", i)}
				if err := nl.LinkAdd(v); err != nil {
					b.Fatal(err)
				}
			}
			nl.Close()
			peer := netip.MustParseAddr("192.168.77.2")
			ctx := b.Context()
			start := time.Now()
			for i := 0; i < 1000; i++ {
				c := Connector{ID: uint32(i + 1), A: Endpoint{Host: h1.addr, Device: fmt.Sprintf("tap%d", i)}, B: Endpoint{Host: peer}}
				if err := h1.dp.Create(ctx, c); err != nil {
					b.Fatal(err)
				}
			}
			setup := time.Since(start)
			list, err := h1.dp.List(ctx)
			if err != nil || len(list) != 1000 {
				b.Fatalf("List: %d connectors, %v", len(list), err)
			}
			start = time.Now()
			for i := 0; i < 1000; i++ {
				if err := h1.dp.Delete(ctx, uint32(i+1)); err != nil {
					b.Fatal(err)
				}
			}
			teardown := time.Since(start)
			benchLine("connectors_1000_setup_s_"+string(backend), setup.Seconds(), "s")
			benchLine("connectors_1000_teardown_s_"+string(backend), teardown.Seconds(), "s")
		}
	}
}

// BenchmarkRateLimit: how closely a RateLimiter cap holds for one TCP
// stream (iperf3 over a plain veth, limited at the sender).
func BenchmarkRateLimit(b *testing.B) {
	for range b.N {
		n, h1, _, a, bv := twoHosts(b, BackendEBPF, 1500, false)
		_, dst := n.directVeth(a, bv, h1.dp.MTU())
		rl, err := NewRateLimiter(a.h, nil)
		if err != nil {
			b.Fatal(err)
		}
		const rate = 25 << 20 // bytes/s
		if err := rl.Set(b.Context(), "d0", rate); err != nil {
			b.Fatal(err)
		}
		got := n.iperf(a, bv, dst) / 8
		rl.Close()
		benchLine("ratelimit_achieved_vs_set", got/rate, "ratio")
	}
}
