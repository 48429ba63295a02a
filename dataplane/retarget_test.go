package dataplane

import (
	"testing"
	"time"
)

const macA, macB, ipA, ipB = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "10.0.0.1", "10.0.0.2"

// streamResult summarises a probe stream across a retarget.
type streamResult struct {
	sent, recv int
	tailOK     int // consecutive echoes at the end: connectivity restored
}

// stream probes dst from vm until done is closed and then `tail` probes in a
// row were echoed, bounded by max probes.
func (n *testNet) stream(vm *testVM, dst string, done <-chan struct{}, tail, max int) <-chan streamResult {
	p := n.pinger(vm, dst)
	out := make(chan streamResult, 1)
	go func() {
		var r streamResult
		finished := false
		for r.sent < max {
			select {
			case <-done:
				finished = true
			default:
			}
			_, ok := p.probe(uint64(r.sent), 64, 200*time.Millisecond)
			r.sent++
			if ok {
				r.recv++
				r.tailOK++
			} else {
				r.tailOK = 0
			}
			if finished && r.tailOK >= tail {
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		out <- r
	}()
	return out
}

// TestRetarget moves endpoint B from h2 to h3 while A on h1 streams probes
// to it: h1 rewrites its endpoint, h3 creates, h2 deletes. The new VM keeps
// B's MAC and IP, so A needs no ARP.
func TestRetarget(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		n := newTestNet(t, b, 1500, false)
		h1, h2, h3 := n.addHost("h1", 1), n.addHost("h2", 2), n.addHost("h3", 3)
		a := n.addVM(h1, "vma", "tapa", macA, ipA)
		oldB := n.addVM(h2, "vmb", "tapb", macB, ipB)
		newB := n.addVM(h3, "vmb2", "tapb", macB, ipB)
		ctx := t.Context()
		c := Connector{ID: 77, A: a.ep(), B: oldB.ep()}
		for _, h := range []*testHost{h1, h2} {
			if err := h.dp.Create(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
		n.mustPing(a, ipB, 3, 64)

		tx := func(h *testHost) uint64 {
			s, err := h.dp.Stats(ctx, c.ID)
			if err != nil {
				t.Fatal(err)
			}
			return s.TxPackets
		}
		done := make(chan struct{})
		res := n.stream(a, ipB, done, 20, 3000)
		start := tx(h1)
		waitFor(t, "the probe stream to flow", func() bool { return tx(h1) >= start+20 })

		moved := Connector{ID: c.ID, A: a.ep(), B: newB.ep()}
		if err := h1.dp.Update(ctx, moved); err != nil {
			t.Fatal(err)
		}
		// Let A's frames reach h3 before h3 knows the connector: the
		// loss a real move has while the VM's state is in flight.
		sentAt := tx(h1)
		waitFor(t, "frames towards h3", func() bool { return tx(h1) >= sentAt+5 })
		if err := h3.dp.Create(ctx, moved); err != nil {
			t.Fatal(err)
		}
		if err := h2.dp.Delete(ctx, c.ID); err != nil {
			t.Fatal(err)
		}
		close(done)
		r := <-res
		lost := r.sent - r.recv
		t.Logf("%s: %d probes, %d lost during the retarget", b, r.sent, lost)
		if r.tailOK < 20 {
			t.Fatalf("connectivity not restored after the retarget: %+v", r)
		}
		if lost < 1 {
			t.Fatalf("no probe lost although h3 got frames before it had the connector: %+v", r)
		}
		s3, err := h3.dp.Stats(ctx, c.ID)
		if err != nil {
			t.Fatal(err)
		}
		if s3.RxPackets < 20 || s3.TxPackets < 20 {
			t.Fatalf("h3 stats %+v: want the stream's tail through h3", s3)
		}
		if b == BackendEBPF && s3.Drops < 1 {
			t.Fatalf("h3 stats %+v: the frames lost before Create are not counted", s3)
		}
		t.Logf("h3 stats after the move: %+v", s3)
		if _, err := h2.dp.Get(ctx, c.ID); err == nil {
			t.Fatal("h2 still has the connector after Delete")
		}
		n.mustPing(a, ipB, 3, 64)
	})
}

// TestMoveOntoHost moves B onto A's host (the connector collapses) and
// back off it (encapsulation resumes), with Update on A's host.
func TestMoveOntoHost(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		n := newTestNet(t, b, 1500, false)
		h1, h2 := n.addHost("h1", 1), n.addHost("h2", 2)
		a := n.addVM(h1, "vma", "tapa", macA, ipA)
		remoteB := n.addVM(h2, "vmb", "tapb", macB, ipB)
		localB := n.addVM(h1, "vmb1", "tapb", macB, ipB)
		ctx := t.Context()
		c := Connector{ID: 9, A: a.ep(), B: remoteB.ep()}
		for _, h := range []*testHost{h1, h2} {
			if err := h.dp.Create(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
		n.mustPing(a, ipB, 3, 64)

		in := Connector{ID: 9, A: a.ep(), B: localB.ep()}
		if err := h1.dp.Update(ctx, in); err != nil {
			t.Fatal(err)
		}
		if err := h2.dp.Delete(ctx, 9); err != nil {
			t.Fatal(err)
		}
		before := linkCounter(t, n, h1.ns, "u0", "tx_packets")
		n.mustPing(a, ipB, 5, 64)
		if after := linkCounter(t, n, h1.ns, "u0", "tx_packets"); after != before {
			t.Fatalf("collapsed connector still used the underlay (%d packets)", after-before)
		}
		if err := h1.dp.Update(ctx, c); err != nil {
			t.Fatal(err)
		}
		if err := h2.dp.Create(ctx, c); err != nil {
			t.Fatal(err)
		}
		n.mustPing(a, ipB, 5, 64)
		if after := linkCounter(t, n, h1.ns, "u0", "tx_packets"); after < before+5 {
			t.Fatalf("connector did not go back to the underlay")
		}
		got, err := h1.dp.Get(ctx, 9)
		if err != nil || got != c {
			t.Fatalf("Get = %+v, %v; want %+v", got, err, c)
		}
	})
}

// TestForeignSender: a host that is not a connector's peer cannot inject
// frames into it, even with the right VNI (h3 claims connector 42 towards
// A on h1 while A's peer is on h2).
func TestForeignSender(t *testing.T) {
	forBackends(t, func(t *testing.T, b Backend) {
		if b == BackendNetdev {
			t.Skip("the netdev fallback demultiplexes by VNI only and trusts the underlay")
		}
		n, h1, _, a, bv := twoHosts(t, b, 1500, false)
		h3 := n.addHost("h3", 3)
		c := n.addVM(h3, "vmc", "tapc", "02:00:00:00:00:0c", "10.0.0.3")
		if err := h3.dp.Create(t.Context(), Connector{ID: 42, A: a.ep(), B: c.ep()}); err != nil {
			t.Fatal(err)
		}
		ra, rb, rc := n.rawSocket(a), n.rawSocket(bv), n.rawSocket(c)
		forged := frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:0c", []uint16{etherExp}, "injected by h3")
		rc.send(forged)
		waitFor(t, "h1 to drop the forged frame", func() bool {
			s, err := h1.dp.Stats(t.Context(), 42)
			return err == nil && s.Drops >= 1
		})
		sentinel := frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:0b", []uint16{etherExp}, "from the real peer")
		rb.send(sentinel)
		ra.await("A", sentinel, forged)
	})
}
