package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"hostd/images/guest/agentapi"
)

// startLoopbackEcho starts the agent's echo server on a free loopback port
// and returns "127.0.0.1:port".
func startLoopbackEcho(t *testing.T, a *agent) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	if r := call(t, a, fmt.Sprintf(`{"id":1,"cmd":"echo","args":{"action":"start","port":%d}}`, port), nil); !r.OK {
		t.Fatalf("echo start: %s", r.Error)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// TestProbeLoopback probes the agent's own echo server over loopback: every
// probe answered, RTTs ordered, and the loopback MTU reported.
func TestProbeLoopback(t *testing.T) {
	a := newTestAgent(t)
	addr := startLoopbackEcho(t, a)
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	wantMTU := min(lo.MTU, 65535) // IP_MTU cannot exceed an IP packet
	for _, c := range []struct {
		proto string
		size  uint32
	}{{"udp", 16}, {"udp", 1400}, {"udp", 65507}, {"tcp", 64}, {"tcp", 1 << 20}} {
		var r agentapi.ProbeResult
		line := fmt.Sprintf(`{"id":2,"cmd":"probe","args":{"addr":%q,"proto":%q,"count":5,"interval_ms":1,"timeout_ms":5000,"size":%d}}`, addr, c.proto, c.size)
		if resp := call(t, a, line, &r); !resp.OK {
			t.Fatalf("%s: %s", line, resp.Error)
		}
		if r.Sent != 5 || r.Received != 5 || r.Lost != 0 || r.Mismatched != 0 || r.LastError != "" {
			t.Errorf("%s %d bytes: %+v, want all 5 answered", c.proto, c.size, r)
		}
		if r.RTTUsMin > r.RTTUsP50 || r.RTTUsP50 > r.RTTUsP90 || r.RTTUsP90 > r.RTTUsMax || r.RTTUsMax == 0 {
			t.Errorf("%s %d bytes: RTTs out of order: %+v", c.proto, c.size, r)
		}
		if r.PathMTU != wantMTU || !strings.HasPrefix(r.LocalAddr, "127.0.0.1:") {
			t.Errorf("%s: path_mtu %d local %q, want loopback's %d from 127.0.0.1", c.proto, r.PathMTU, r.LocalAddr, wantMTU)
		}
		if c.proto == "tcp" && r.Connects != 1 {
			t.Errorf("tcp: %d connections for 5 answered probes, want 1", r.Connects)
		}
	}
}

// TestProbeNoServer: probes to a port nobody serves are all lost, with the
// reason, and the request still succeeds.
func TestProbeNoServer(t *testing.T) {
	u, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := u.LocalAddr().String()
	u.Close() // now nobody listens on it (TCP or UDP, very likely)
	for _, proto := range []string{"udp", "tcp"} {
		r, err := probe(context.Background(), agentapi.ProbeArgs{Addr: addr, Proto: proto, Count: 3, TimeoutMS: 200, Size: 32})
		if err != nil {
			t.Fatalf("%s: %v", proto, err)
		}
		if r.Sent != 3 || r.Received != 0 || r.Lost != 3 || r.LastError == "" || r.RTTUsMax != 0 {
			t.Errorf("%s to a closed port: %+v, want 3 lost with an error", proto, r)
		}
	}
}

// TestProbeMismatch: an echo server that corrupts one byte is noticed.
func TestProbeMismatch(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			buf[n-1] ^= 0xff
			pc.WriteTo(buf[:n], from)
		}
	}()
	r, err := probe(context.Background(), agentapi.ProbeArgs{Addr: pc.LocalAddr().String(), Proto: "udp", Count: 2, TimeoutMS: 2000, Size: 100})
	pc.Close()
	<-done
	if err != nil || r.Received != 0 || r.Mismatched != 2 || r.Lost != 2 || !strings.Contains(r.LastError, "differs") {
		t.Errorf("corrupting echo: %+v %v, want 2 mismatched", r, err)
	}
}

func TestPercentile(t *testing.T) {
	d := []int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	sorted := make([]time.Duration, len(d))
	for i, v := range d {
		sorted[i] = time.Duration(v)
	}
	for _, c := range []struct{ pct, want int }{{50, 5}, {90, 9}, {100, 10}, {1, 1}, {0, 1}} {
		if got := percentile(sorted, c.pct); got != time.Duration(c.want) {
			t.Errorf("p%d = %d, want %d", c.pct, got, c.want)
		}
	}
	if got := percentile(sorted[:1], 50); got != 1 {
		t.Errorf("p50 of one = %d", got)
	}
}
