package agentclient_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
	"hostd/images/guest/guestimage"
)

// testVM is one QEMU process running the test guest under TCG.
type testVM struct {
	sock, serial string
	started      time.Time
	stop         func() // kill QEMU and wait (bounded); idempotent
}

// bootVM starts QEMU and arranges for it to be killed, with a bounded
// wait, when the test ends.
func bootVM(t *testing.T, img guestimage.Image, cmdline string, extra ...string) *testVM {
	t.Helper()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skipf("qemu-system-x86_64 not installed: %v", err)
	}
	dir := t.TempDir()
	vm := &testVM{sock: filepath.Join(dir, "agent.sock"), serial: filepath.Join(dir, "serial.log")}
	args, err := img.QEMUArgs(guestimage.BootConfig{AgentSocket: vm.sock, SerialLog: vm.serial, Cmdline: cmdline, Extra: extra})
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(filepath.Join(dir, "qemu.out"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(qemu, args...)
	cmd.Stdout, cmd.Stderr = out, out
	vm.started = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var once sync.Once
	vm.stop = func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Errorf("qemu pid %d did not exit within 10s of SIGKILL", cmd.Process.Pid)
			}
		})
	}
	t.Cleanup(func() {
		vm.stop()
		out.Close()
		if t.Failed() {
			b, _ := os.ReadFile(vm.serial)
			q, _ := os.ReadFile(out.Name())
			t.Logf("serial log:\n%s\nqemu output:\n%s", b, q)
		}
	})
	return vm
}

// freePort returns a loopback port free for both TCP and UDP right now.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no loopback port free for both TCP and UDP")
	return 0
}

// waitFor polls f until it reports done, bounded by ctx.
func waitFor(ctx context.Context, what string, f func() (bool, error)) error {
	for {
		done, err := f()
		if err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func TestGuestAgent(t *testing.T) {
	img := guestimage.Require(t)
	hostPort := freePort(t)
	const guestEcho = 7
	// User-mode networking, forwarding one loopback port (TCP and UDP) to
	// the guest: test traffic stays on loopback. Not restrict=on: libslirp
	// then drops the guest's UDP replies to forwarded datagrams.
	netdev := fmt.Sprintf("user,id=n0,hostfwd=tcp:127.0.0.1:%d-:%d,hostfwd=udp:127.0.0.1:%d-:%d",
		hostPort, guestEcho, hostPort, guestEcho)
	vm := bootVM(t, img, "hostd.ip=10.0.2.15/24 hostd.run=dirty,region=boot,size_mib=4,seed=9,passes=1",
		"-netdev", netdev, "-device", "virtio-net-pci,netdev=n0")

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	ready, err := agentclient.WaitReady(ctx, vm.serial)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("measure: qemu start to ready line %.2fs wall, guest uptime at ready %d ms, initrd %d bytes",
		time.Since(vm.started).Seconds(), ready.UptimeMS, img.Manifest.InitrdBytes)
	if ready.Kernel != img.Manifest.KernelRelease || ready.Fields["ip"] != "10.0.2.15/24" ||
		!strings.HasPrefix(ready.Fields["port"], "/dev/vport") || ready.Fields["boot_errors"] != "0" {
		t.Fatalf("ready line %+v: want kernel %s, ip, a vport and no boot errors", ready.Fields, img.Manifest.KernelRelease)
	}

	c, err := agentclient.Dial(ctx, vm.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	t.Run("ping", func(t *testing.T) {
		p, err := c.Ping(ctx)
		if err != nil || !p.Pong || p.UptimeMS < ready.UptimeMS {
			t.Fatalf("ping: %+v %v (ready at %d ms)", p, err, ready.UptimeMS)
		}
	})

	t.Run("boot workload from hostd.run", func(t *testing.T) {
		if err := waitFor(ctx, "boot workload", func() (bool, error) {
			st, err := c.Ops(ctx, "boot")
			return !st.Running, err
		}); err != nil {
			t.Fatal(err)
		}
		got, err := c.VerifyChecksum(ctx, "boot")
		if err != nil {
			t.Fatal(err)
		}
		if got.PassesDone != 1 || got.PageInPass != 0 || got.Seed != 9 {
			t.Errorf("boot region %+v, want exactly one pass of seed 9", got)
		}
	})

	t.Run("dirty two passes", func(t *testing.T) {
		if _, err := c.Dirty(ctx, agentapi.DirtyArgs{Region: "two", SizeMiB: 16, Seed: 1234567, Passes: 2}); err != nil {
			t.Fatal(err)
		}
		if err := waitFor(ctx, "two passes", func() (bool, error) {
			st, err := c.Ops(ctx, "two")
			return !st.Running, err
		}); err != nil {
			t.Fatal(err)
		}
		got, err := c.VerifyChecksum(ctx, "two")
		if err != nil {
			t.Fatal(err)
		}
		st, err := c.Ops(ctx, "two")
		if err != nil {
			t.Fatal(err)
		}
		if got.PassesDone != 2 || st.PagesTotal != 2*16*agentapi.PagesPerMiB {
			t.Errorf("after two passes: checksum %+v, status %+v", got, st)
		}
		// The guest's own expectation agrees with the host's and with the
		// region, also for a position the writer never stopped at.
		exp, err := c.Expected(ctx, agentapi.ExpectedArgs{SizeMiB: 16, Seed: 1234567, PassesDone: 2})
		if err != nil || exp.SHA256 != got.SHA256 {
			t.Errorf("guest-computed expected checksum %+v %v, region has %s", exp, err, got.SHA256)
		}
		mid, err := c.Expected(ctx, agentapi.ExpectedArgs{SizeMiB: 16, Seed: 1234567, PassesDone: 1, PageInPass: 1000})
		hostMid, herr := agentclient.ExpectedChecksum(16, 1234567, 1, 1000)
		if err != nil || herr != nil || mid.SHA256 != hex.EncodeToString(hostMid[:]) {
			t.Errorf("mid-pass expected: guest %+v %v, host %x %v", mid, err, hostMid, herr)
		}
	})

	t.Run("ops counter grows and stop keeps a verifiable region", func(t *testing.T) {
		if _, err := c.Dirty(ctx, agentapi.DirtyArgs{Region: "live", SizeMiB: 8, RateMiBs: 16, Seed: 42}); err != nil {
			t.Fatal(err)
		}
		var last agentapi.WorkloadStatus
		increases := 0
		if err := waitFor(ctx, "three increases of pages_total and a rate sample", func() (bool, error) {
			st, err := c.Ops(ctx, "live")
			if err != nil {
				return false, err
			}
			if st.PagesTotal < last.PagesTotal {
				return false, fmt.Errorf("pages_total went back from %d to %d", last.PagesTotal, st.PagesTotal)
			}
			if st.PagesTotal > last.PagesTotal {
				increases++
			}
			last = st
			return increases >= 3 && st.PagesPerSec > 0, nil
		}); err != nil {
			t.Fatal(err)
		}
		t.Logf("measure: live workload at %.0f pages/s (asked 16 MiB/s = %d pages/s)", last.PagesPerSec, 16*agentapi.PagesPerMiB)
		// Mid-pass: the checksum and the writer position are taken
		// together, so even a running region verifies.
		if _, err := c.VerifyChecksum(ctx, "live"); err != nil {
			t.Errorf("running region: %v", err)
		}
		st, err := c.Stop(ctx, "live")
		if err != nil || st.Running {
			t.Fatalf("stop: %+v %v", st, err)
		}
		got, err := c.VerifyChecksum(ctx, "live")
		if err != nil {
			t.Fatal(err)
		}
		if got.PassesDone != st.PassesDone || got.PageInPass != st.PageInPass || got.Running {
			t.Errorf("checksum %+v does not match stopped writer %+v", got, st)
		}
	})

	t.Run("echo over virtio-net", func(t *testing.T) {
		if _, err := c.EchoStart(ctx, guestEcho); err != nil {
			t.Fatal(err)
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(hostPort))
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		msg := []byte("hostd tcp echo")
		if _, err := conn.Write(msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != string(msg) {
			t.Fatalf("tcp echo: %q %v", buf, err)
		}

		u, err := net.Dial("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		// UDP may drop a datagram; a bounded number of tries.
		var got string
		for try := 0; try < 10 && got == ""; try++ {
			if _, err := u.Write([]byte("hostd udp echo")); err != nil {
				t.Fatal(err)
			}
			_ = u.SetReadDeadline(time.Now().Add(2 * time.Second))
			b := make([]byte, 64)
			if n, err := u.Read(b); err == nil {
				got = string(b[:n])
			}
		}
		if got != "hostd udp echo" {
			t.Fatalf("udp echo: got %q", got)
		}

		if r, err := c.EchoStop(ctx); err != nil || r.Running {
			t.Fatalf("echo stop: %+v %v", r, err)
		}
		// The open connection is closed by the guest.
		if n, err := conn.Read(buf); err == nil {
			t.Errorf("tcp connection still echoing after stop (%d bytes)", n)
		}
	})

	t.Run("bad commands get JSON errors", func(t *testing.T) {
		resp, err := c.RoundTripRaw(ctx, []byte("this is not json"))
		if err != nil || resp.OK || resp.ID != 0 || !strings.Contains(resp.Error, "decode request") {
			t.Errorf("garbage: %+v %v", resp, err)
		}
		resp, err = c.RoundTripRaw(ctx, []byte(strings.Repeat("x", agentapi.MaxLineBytes+10)))
		if err != nil || resp.OK || !strings.Contains(resp.Error, "exceeds") {
			t.Errorf("overlong line: %+v %v", resp, err)
		}
		var ae *agentclient.AgentError
		for _, tc := range []struct {
			cmd  string
			args any
			msg  string
		}{
			{"fly", nil, "unknown command"},
			{agentapi.CmdDirty, agentapi.DirtyArgs{Region: "z", SizeMiB: 0}, "size_mib 0"},
			{agentapi.CmdDirty, agentapi.DirtyArgs{Region: "z", SizeMiB: 4096}, "does not fit"},
			{agentapi.CmdDirty, agentapi.DirtyArgs{Region: "two", SizeMiB: 1}, ""}, // replacing a stopped region is fine
			{agentapi.CmdChecksum, agentapi.RegionArgs{Region: "nope"}, "no such region"},
			{agentapi.CmdEcho, agentapi.EchoArgs{Action: "start"}, "port"},
			{agentapi.CmdDirty, map[string]any{"region": "z", "size_mib": 1, "bogus": 1}, "unknown field"},
		} {
			err := c.Call(ctx, tc.cmd, tc.args, nil)
			if tc.msg == "" {
				if err != nil {
					t.Errorf("%s %v: %v", tc.cmd, tc.args, err)
				}
				continue
			}
			if !errors.As(err, &ae) || !strings.Contains(ae.Message, tc.msg) {
				t.Errorf("%s %v: %v, want an agent error about %q", tc.cmd, tc.args, err, tc.msg)
			}
		}
		// The stream is still in step.
		if _, err := c.Ping(ctx); err != nil {
			t.Errorf("ping after errors: %v", err)
		}
	})

	t.Run("meminfo and stats", func(t *testing.T) {
		mi, err := c.MemInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		total := mi.KiB["MemTotal"]
		if total == 0 || total > 256*1024 || mi.KiB["Mlocked"] == 0 {
			t.Errorf("meminfo: MemTotal %d KiB, Mlocked %d KiB for a 256 MiB guest with locked regions", total, mi.KiB["Mlocked"])
		}
		st, err := c.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Kernel != ready.Kernel || st.MemTotalKiB != total || st.RequestsServed == 0 || !contains(st.Workloads, "boot") {
			t.Errorf("stats %+v", st)
		}
		// Every module build.sh packed was loaded by /init (as a module,
		// not built in, in this kernel).
		for _, m := range img.Manifest.Modules {
			name := strings.TrimSuffix(filepath.Base(m), ".ko")
			if !contains(st.Modules, strings.ReplaceAll(name, "-", "_")) {
				t.Errorf("module %s not loaded; loaded: %v", name, st.Modules)
			}
		}
	})

	t.Run("reconnect", func(t *testing.T) {
		// A restore brings a new QEMU and a new socket connection; the
		// agent must serve whoever connects next.
		c.Close()
		c2, err := agentclient.Dial(ctx, vm.sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close()
		if _, err := c2.Ping(ctx); err != nil {
			t.Fatalf("ping on a new connection: %v", err)
		}
		if _, err := c2.VerifyChecksum(ctx, "boot"); err != nil {
			t.Error(err)
		}
	})

	serial, err := os.ReadFile(vm.serial)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(serial), agentapi.ResultPrefix+` {"id":`) {
		t.Error("serial console shows no command results")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
