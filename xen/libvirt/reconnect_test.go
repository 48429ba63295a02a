package libvirt

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"hostd/xen"
)

const libvirtdPidFile = "/run/libvirtd.pid"

// libvirtdPid returns the pid of the running libvirtd, checked against
// /proc so that a stale pid file never makes us signal another process.
func libvirtdPid(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(libvirtdPidFile)
	if err != nil {
		t.Skipf("no %s (%v): libvirtd is not run by `libvirtd -d` here", libvirtdPidFile, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Skipf("%s: %v", libvirtdPidFile, err)
	}
	comm, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	if err != nil || strings.TrimSpace(string(comm)) != "libvirtd" {
		t.Skipf("pid %d from %s is not libvirtd (%q, %v)", pid, libvirtdPidFile, comm, err)
	}
	return pid
}

// TestLibvirtdRestart stops the shared libvirtd under a running guest and
// an event subscription, checks that calls fail with ErrUnavailable rather
// than hang, starts libvirtd again and checks that the driver reconnects by
// itself, the guest ran on, and events flow again. The outage is kept to a
// few seconds: other tests on this machine use the same daemon.
func TestLibvirtdRestart(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}

	name := uniqueName(t)
	spec := guestSpec(t, g, name, shortTempDir(t))
	cleanupDomain(t, d, name)
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	if err := d.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitSerial(t, spec.SerialLog, "HOSTD-AGENT READY", 1, bootTimeout)
	before, err := d.Domain(ctx, name)
	if err != nil {
		t.Fatal(err)
	}

	pid := libvirtdPid(t)

	// A daemon that does not answer (stopped, not gone) holds a call only
	// as long as the caller's context allows. About a second of outage.
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("pause libvirtd: %v", err)
	}
	cont := func() { syscall.Kill(pid, syscall.SIGCONT) }
	t.Cleanup(cont)
	hctx, hcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = d.Domain(hctx, name)
	hcancel()
	cont()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Domain while libvirtd is paused: want DeadlineExceeded, got %v", err)
	}
	// The abandoned call completes once the daemon runs again, and the
	// connection is still good.
	if _, err := d.Domain(ctx, name); err != nil {
		t.Fatalf("Domain after libvirtd continued: %v", err)
	}

	restarted := false
	restart := func() {
		if restarted {
			return
		}
		restarted = true
		out, err := exec.Command("libvirtd", "-d").CombinedOutput()
		if err != nil {
			t.Errorf("restart libvirtd: %v: %s", err, out)
		}
	}
	// Whatever happens below, libvirtd comes back.
	t.Cleanup(restart)

	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("stop libvirtd: %v", err)
	}
	waitFor(t, "libvirtd to exit", 30*time.Second, func() (bool, error) {
		return syscall.Kill(pid, 0) != nil, nil
	})

	// While it is away every call fails with ErrUnavailable. The context
	// is only a backstop: a hang shows up as a context error, not as a
	// timing assertion.
	down := time.Now()
	for op, call := range map[string]func(context.Context) error{
		"Domain": func(ctx context.Context) error { _, err := d.Domain(ctx, name); return err },
		"List":   func(ctx context.Context) error { _, err := d.List(ctx); return err },
		"Start":  func(ctx context.Context) error { return d.Start(ctx, name) },
		"Host":   func(ctx context.Context) error { _, err := d.Host(ctx); return err },
	} {
		cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
		t0 := time.Now()
		err := call(cctx)
		ccancel()
		if !errors.Is(err, xen.ErrUnavailable) {
			t.Errorf("%s while libvirtd is down: want ErrUnavailable, got %v", op, err)
		}
		t.Logf("measured: %s failed after %s: %v", op, time.Since(t0).Round(time.Microsecond), err)
	}
	if _, err := d.Events(ctx); !errors.Is(err, xen.ErrUnavailable) {
		t.Errorf("Events while libvirtd is down: want ErrUnavailable, got %v", err)
	}

	restart()
	var after xen.DomainInfo
	waitFor(t, "the driver to reach the restarted libvirtd", 60*time.Second, func() (bool, error) {
		after, err = d.Domain(ctx, name)
		if errors.Is(err, xen.ErrUnavailable) {
			return false, nil
		}
		return err == nil, err
	})
	t.Logf("measured: libvirtd away for %s", time.Since(down).Round(time.Millisecond))
	if after.State != xen.StateRunning || after.ID != before.ID || after.UUID != before.UUID {
		t.Fatalf("guest after libvirtd restart: %+v, before: %+v", after, before)
	}
	agentPing(t, spec.AgentSocket)

	// The subscription survived: it hears of the reconnection, then of
	// our domain's next events.
	if err := d.Suspend(ctx, name); err != nil {
		t.Fatalf("Suspend after restart: %v", err)
	}
	if err := d.Resume(ctx, name); err != nil {
		t.Fatalf("Resume after restart: %v", err)
	}
	var sawReconnect, sawSuspend, sawResume bool
	timeout := time.After(30 * time.Second)
	for !(sawReconnect && sawSuspend && sawResume) {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("event channel closed across the restart")
			}
			switch {
			case ev.Event == xen.EventReconnected:
				sawReconnect = true
			case ev.Domain == name && ev.Event == xen.EventSuspended:
				sawSuspend = true
			case ev.Domain == name && ev.Event == xen.EventResumed && sawSuspend:
				sawResume = true
			}
		case <-timeout:
			t.Fatalf("events after restart: reconnected %v, suspended %v, resumed %v", sawReconnect, sawSuspend, sawResume)
		}
	}
}
