package libvirt

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"hostd/xen"
)

// The integration tests boot real guests under TCG through the system
// libvirtd. The guest is hostd's test guest, built by
// images/guest/build.sh into build/guest (HOSTD_GUEST_DIR overrides).

const libvirtSocket = "/run/libvirt/libvirt-sock"

// repoRoot finds the module root from this file's location.
func repoRoot(t testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test source")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

type guestFiles struct{ Kernel, Initrd string }

// testGuest returns the test guest, building it if it is missing and the
// build script is there; it skips the test when neither works.
func testGuest(t testing.TB) guestFiles {
	t.Helper()
	dir := os.Getenv("HOSTD_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(repoRoot(t), "build", "guest")
	}
	g := guestFiles{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	if fileExists(g.Kernel) && fileExists(g.Initrd) {
		return g
	}
	script := filepath.Join(repoRoot(t), "images", "guest", "build.sh")
	if !fileExists(script) {
		t.Skipf("test guest missing in %s and no %s to build it: run `make guest`", dir, script)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "bash", script, dir).CombinedOutput()
	if err != nil || !fileExists(g.Kernel) || !fileExists(g.Initrd) {
		t.Skipf("test guest missing in %s and building it failed (%v): %s", dir, err, lastLines(out, 10))
	}
	return g
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// requireLibvirt skips where there is no system libvirtd to test against.
func requireLibvirt(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for qemu:///system")
	}
	if _, err := os.Stat(libvirtSocket); err != nil {
		t.Skipf("no libvirtd (%v): run images/blanket/provision.sh", err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newTestDriver opens a TCG driver and closes it with the test.
func newTestDriver(t testing.TB) *Driver {
	t.Helper()
	requireLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := New(ctx, Config{Accel: xen.AccelTCG, Logger: testLogger(t), BalloonStatsPeriod: time.Second})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// uniqueName is a domain name no other test (or test run) uses.
func uniqueName(t testing.TB) string {
	var b [4]byte
	rand.Read(b[:])
	base := strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
	base = strings.TrimPrefix(base, "test")
	if len(base) > 40 {
		base = base[:40]
	}
	return "t-xen-" + strings.Trim(base, "-") + "-" + hex.EncodeToString(b[:])
}

// shortTempDir is a temp dir with a short path: unix socket paths are
// limited to 107 bytes and t.TempDir's can be long.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "xen")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// guestSpec is a 256 MiB, 1 vCPU guest with serial log, agent channel and
// its RAM file in dir.
func guestSpec(t testing.TB, g guestFiles, name, dir string) xen.DomainSpec {
	return xen.DomainSpec{
		Name:        name,
		VCPUs:       1,
		MemoryMiB:   256,
		Kernel:      g.Kernel,
		Initrd:      g.Initrd,
		Cmdline:     "console=ttyS0 panic=-1",
		RAMPath:     filepath.Join(dir, "ram"),
		SerialLog:   filepath.Join(dir, "serial.log"),
		AgentSocket: filepath.Join(dir, "agent.sock"),
	}
}

// cleanupDomain destroys and undefines name when the test ends, pass or
// fail, with its own deadline.
func cleanupDomain(t testing.TB, d *Driver, name string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := d.Destroy(ctx, name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("cleanup: destroy %s: %v", name, err)
		}
		if err := d.Undefine(ctx, name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("cleanup: undefine %s: %v", name, err)
		}
	})
}

// waitFor polls cond every 100ms until it is true or timeout passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for i := 0; ; i++ {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) || i > int(timeout/(100*time.Millisecond))+10 {
			t.Fatalf("waiting for %s: not within %s", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// bootTimeout bounds a TCG boot to the agent's ready line; generous because
// other tests (and engineers) share the two cores.
const bootTimeout = 90 * time.Second

func waitSerial(t testing.TB, path, marker string, count int, timeout time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d× %q in %s", count, marker, path), timeout, func() (bool, error) {
		b, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return bytes.Count(b, []byte(marker)) >= count, err
	})
}

func fileSize(t testing.TB, path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// agentCall sends one request to the guest agent over its virtio-serial
// socket and returns the result of the response.
func agentCall(t testing.TB, sock, cmd string, args any) json.RawMessage {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatalf("agent %s: dial: %v", cmd, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	req := map[string]any{"id": 1, "cmd": cmd}
	if args != nil {
		req["args"] = args
	}
	line, _ := json.Marshal(req)
	if _, err := c.Write(append(line, '\n')); err != nil {
		t.Fatalf("agent %s: write: %v", cmd, err)
	}
	r := bufio.NewReader(c)
	for i := 0; i < 100; i++ {
		resp, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("agent %s: read: %v", cmd, err)
		}
		var m struct {
			ID     uint64          `json:"id"`
			OK     bool            `json:"ok"`
			Error  string          `json:"error"`
			Result json.RawMessage `json:"result"`
		}
		if err := json.Unmarshal(resp, &m); err != nil {
			t.Fatalf("agent %s: bad response %q: %v", cmd, resp, err)
		}
		if m.ID != 1 {
			continue // a stale answer
		}
		if !m.OK {
			t.Fatalf("agent %s: %s", cmd, m.Error)
		}
		return m.Result
	}
	t.Fatalf("agent %s: no answer", cmd)
	return nil
}

type pingResult struct {
	Pong     bool   `json:"pong"`
	UptimeMS uint64 `json:"uptime_ms"`
}

func agentPing(t testing.TB, sock string) pingResult {
	var p pingResult
	if err := json.Unmarshal(agentCall(t, sock, "ping", nil), &p); err != nil {
		t.Fatalf("agent ping: %v", err)
	}
	if !p.Pong {
		t.Fatalf("agent ping: pong false")
	}
	return p
}
