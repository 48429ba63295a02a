package integration

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/hostd/hostdtest"
	"hostd/hostd/vm"
)

// hostd speaks sd_notify as systemd expects of a Type=notify service with a
// watchdog: READY=1 once it serves, WATCHDOG=1 within the interval, and
// STOPPING=1 on SIGTERM; and the graceful stop leaves guests running.
func TestSystemdNotifyAndGracefulStop(t *testing.T) {
	dir := t.TempDir()
	notify := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 256)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	// A 2 s watchdog: hostd must pet it about every second.
	d := startHostd(t, hostdtest.Options{Env: []string{"NOTIFY_SOCKET=" + notify, "WATCHDOG_USEC=2000000"}})
	expect := func(what string, within time.Duration) {
		t.Helper()
		deadline := time.After(within)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("notify socket closed before %s", what)
				}
				if strings.Contains(m, what) {
					return
				}
			case <-deadline:
				t.Fatalf("no %s from hostd within %v", what, within)
			}
		}
	}
	expect("READY=1", 30*time.Second)
	expect("WATCHDOG=1", 10*time.Second)
	expect("WATCHDOG=1", 10*time.Second) // and again: it keeps petting

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	name := prefix + "graceful"
	if _, err := d.Client.CreateVM(ctx, vm.Request{Name: name, MemoryMiB: 128}); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	expect("STOPPING=1", 5*time.Second)
	if out, err := hostdtest.Virsh("domstate", name); err != nil || strings.TrimSpace(out) != "running" {
		t.Fatalf("guest after a graceful hostd stop: %q %v (a stop must never stop guests)", out, err)
	}
}
