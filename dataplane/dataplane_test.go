package dataplane

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"
)

var backends = []Backend{BackendEBPF, BackendNetdev}

func forBackends(t *testing.T, fn func(t *testing.T, b Backend)) {
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) { fn(t, b) })
	}
}

// twoHosts: vmA on h1 and vmB on h2, joined by connector 42.
func twoHosts(t testing.TB, b Backend, mtu int, ipv6 bool) (*testNet, *testHost, *testHost, *testVM, *testVM) {
	n := newTestNet(t, b, mtu, ipv6)
	h1, h2 := n.addHost("h1", 1), n.addHost("h2", 2)
	a := n.addVM(h1, "vma", "tapa", "02:00:00:00:00:0a", "10.0.0.1")
	bv := n.addVM(h2, "vmb", "tapb", "02:00:00:00:00:0b", "10.0.0.2")
	c := Connector{ID: 42, A: a.ep(), B: bv.ep()}
	ctx := context.Background()
	for _, h := range []*testHost{h1, h2} {
		if err := h.dp.Create(ctx, c); err != nil {
			t.Fatalf("create on %s: %v", h.name, err)
		}
	}
	return n, h1, h2, a, bv
}

func TestPingAndTCP(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		for _, ipv6 := range []bool{false, true} {
			t.Run("ipv6="+strconv.FormatBool(ipv6), func(t *testing.T) {
				n, h1, h2, a, bv := twoHosts(t, b, 1500, ipv6)
				want := 1450
				if ipv6 {
					want = 1430
				}
				if h1.dp.MTU() != want {
					t.Fatalf("MTU %d, want %d", h1.dp.MTU(), want)
				}
				if got := linkCounter(t, n, h1.ns, "tapa", "../mtu"); got != uint64(want) {
					t.Fatalf("tap MTU %d, want %d", got, want)
				}
				n.mustPing(a, "10.0.0.2", 5, 64)
				// Full-size frames, no fragmentation allowed.
				n.mustPing(bv, "10.0.0.1", 3, want-28)
				tcpTransfer(t, a, bv, 16<<20)

				ctx := context.Background()
				for _, h := range []*testHost{h1, h2} {
					s, err := h.dp.Stats(ctx, 42)
					if err != nil {
						t.Fatal(err)
					}
					if s.TxPackets < 8 || s.RxPackets < 8 || s.TxBytes == 0 || s.RxBytes == 0 {
						t.Errorf("%s stats %+v: want at least the 8 pings each way", h.name, s)
					}
				}
			})
		}
	})
}

// tcpTransfer sends size random bytes from a to b over TCP and checks them.
func tcpTransfer(t testing.TB, a, b *testVM, size int) {
	t.Helper()
	var ln net.Listener
	if err := inNetns(b.h, func() (err error) { ln, err = net.Listen("tcp", b.ip+":5001"); return }); err != nil {
		t.Fatalf("listen in %s: %v", b.name, err)
	}
	defer ln.Close()
	var conn net.Conn
	err := inNetns(a.h, func() (err error) { conn, err = net.DialTimeout("tcp", b.ip+":5001", 5*time.Second); return })
	if err != nil {
		t.Fatalf("dial from %s: %v", a.name, err)
	}
	defer conn.Close()
	data := make([]byte, size)
	rand.Read(data)
	var wg sync.WaitGroup
	var got [32]byte
	var rerr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			rerr = err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(60 * time.Second))
		h := sha256.New()
		_, rerr = io.CopyN(h, c, int64(size))
		copy(got[:], h.Sum(nil))
	}()
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := conn.Write(data); err != nil {
		t.Fatalf("send: %v", err)
	}
	wg.Wait()
	if rerr != nil {
		t.Fatalf("receive: %v", rerr)
	}
	if want := sha256.Sum256(data); !bytes.Equal(got[:], want[:]) {
		t.Fatal("TCP data corrupted across the connector")
	}
}

func TestJumboUnderlay(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		n, h1, _, a, _ := twoHosts(t, b, 9000, false)
		if h1.dp.MTU() != 8950 {
			t.Fatalf("MTU %d, want 8950", h1.dp.MTU())
		}
		n.mustPing(a, "10.0.0.2", 3, 8950-28)
	})
}

func TestCollapse(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		n := newTestNet(t, b, 1500, false)
		h1 := n.addHost("h1", 1)
		a := n.addVM(h1, "vma", "tapa", "02:00:00:00:00:0a", "10.0.0.1")
		bv := n.addVM(h1, "vmb", "tapb", "02:00:00:00:00:0b", "10.0.0.2")
		ctx := context.Background()
		if err := h1.dp.Create(ctx, Connector{ID: 7, A: a.ep(), B: bv.ep()}); err != nil {
			t.Fatal(err)
		}
		before := linkCounter(t, n, h1.ns, "u0", "tx_packets")
		n.mustPing(a, "10.0.0.2", 5, 64)
		tcpTransfer(t, a, bv, 4<<20)
		if after := linkCounter(t, n, h1.ns, "u0", "tx_packets"); after != before {
			t.Errorf("collapsed connector sent %d packets on the underlay, want none", after-before)
		}
		s, err := h1.dp.Stats(ctx, 7)
		if err != nil {
			t.Fatal(err)
		}
		if s.TxPackets < 10 || s.RxPackets < 10 {
			t.Errorf("stats %+v: want at least the 10 ping frames", s)
		}
	})
}
