package dataplane

import (
	"errors"
	"log/slog"
	"os/exec"
	"testing"
)

// TestRestart: with pinned maps, connectors keep forwarding after Close (a
// hostd restart) and the next New adopts them with their counters.
func TestRestart(t *testing.T) {
	n, h1, h2, a, bv := twoHosts(t, BackendEBPF, 1500, false)
	pin := t.TempDir()
	// A private bpffs instance for this test only.
	if out, err := exec.Command("mount", "-t", "bpf", "bpf", pin).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a bpffs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", pin).Run() })
	ctx := t.Context()
	if err := h1.dp.Close(); err != nil {
		t.Fatal(err)
	}
	open := func() Dataplane {
		dp, err := New(ctx, Config{Backend: BackendEBPF, Underlay: h1.addr, Netns: h1.h, PinPath: pin, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Close() })
		return dp
	}
	first := open()
	c := Connector{ID: 42, A: a.ep(), B: bv.ep()}
	if err := first.Create(ctx, c); err != nil {
		t.Fatal(err)
	}
	n.mustPing(a, ipB, 3, 64)
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	n.mustPing(a, ipB, 3, 64) // nobody home, still forwarding

	second := open()
	list, err := second.List(ctx)
	want := Connector{ID: 42, A: a.ep(), B: Endpoint{Host: h2.addr}}
	if err != nil || len(list) != 1 || list[0] != want {
		t.Fatalf("adopted %+v, %v; want [%+v]", list, err, want)
	}
	s, err := second.Stats(ctx, 42)
	if err != nil {
		t.Fatal(err)
	}
	if s.TxPackets < 6 || s.RxPackets < 6 {
		t.Fatalf("stats %+v: want the 6 probes of both runs", s)
	}
	n.mustPing(a, ipB, 3, 64)
	if err := second.Create(ctx, c); !errors.Is(err, ErrExists) {
		t.Fatalf("Create of an adopted connector: err = %v, want ErrExists", err)
	}
	if err := second.Delete(ctx, 42); err != nil {
		t.Fatal(err)
	}
	n.pingFails(a, ipB, 2)

	if _, err := New(ctx, Config{Backend: BackendNetdev, Underlay: h1.addr, Netns: h1.h, PinPath: pin}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("PinPath with netdev: err = %v, want ErrInvalid", err)
	}
}
