package hostdtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/images/guest/guestimage"
)

// Build compiles hostd and hostctl into dir and returns dir.
func Build(dir string) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("go", "build", "-o", dir+"/", "./hostd/cmd/hostd", "./hostd/cmd/hostctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build hostd: %w\n%s", err, out)
	}
	return dir, nil
}

func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	return guestimage.RepoRoot(wd)
}

// Daemon is a hostd child process with its own state and socket.
type Daemon struct {
	tb     testing.TB
	BinDir string
	Dir    string // scratch root: config, state, run, log
	Config config.Config
	Image  guestimage.Image
	Client *client.Client
	cmd    *exec.Cmd
	exited chan error
	netns  string
	env    []string
}

// Options tune a daemon before it starts.
type Options struct {
	Accel string // default "tcg": the auto probe costs ~15 s a start
	// Edit, if set, changes the configuration before it is written.
	Edit func(*config.Config)
	// Netns runs the daemon inside that network namespace (a test's
	// stand-in host); it still reaches libvirtd, whose socket is a file.
	Netns string
	// Env is added to the daemon's environment (e.g. NOTIFY_SOCKET).
	Env []string
}

// Start writes a configuration and starts hostd, and returns once its
// socket answers. The daemon is stopped at the end of the test; its
// domains are not removed here (see CleanupDomains).
func Start(tb testing.TB, binDir string, o Options) *Daemon {
	tb.Helper()
	img := guestimage.Require(tb)
	// Unix socket paths are limited to 107 bytes: keep the root short.
	dir, err := os.MkdirTemp("", "hd")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	cfg := config.Default()
	cfg.StateDir, cfg.RunDir = filepath.Join(dir, "state"), filepath.Join(dir, "run")
	cfg.API.Socket = filepath.Join(cfg.RunDir, "hostd.sock")
	cfg.Guest.Kernel, cfg.Guest.Initrd = img.Kernel, img.Initrd
	cfg.Hypervisor.Accel = "tcg"
	if o.Accel != "" {
		cfg.Hypervisor.Accel = o.Accel
	}
	cfg.Hypervisor.ShutdownTimeout = config.Duration{Duration: 30 * time.Second}
	cfg.Hypervisor.ReconcileInterval = config.Duration{Duration: 2 * time.Second}
	cfg.Log.Format = "text"
	cfg.Log.Level = "debug"
	if o.Edit != nil {
		o.Edit(&cfg)
	}
	d := &Daemon{tb: tb, BinDir: binDir, Dir: dir, Config: cfg, Image: img, netns: o.Netns, env: o.Env}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(cfg); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(d.ConfigPath(), buf.Bytes(), 0o600); err != nil {
		tb.Fatal(err)
	}
	d.Client = client.New(cfg.API.Socket)
	d.start()
	tb.Cleanup(func() {
		d.Stop()
		if tb.Failed() {
			d.dumpLog()
		}
		d.killMemoryServers()
	})
	return d
}

// killMemoryServers ends the memory servers this daemon started and left
// behind (they outlive hostd by design) and detaches their mounts. The
// domains whose RAM they serve are destroyed first: a memory server killed
// under a running guest can leave QEMU's vCPU threads waiting forever on a
// page writeback that will never complete (seen here: unkillable QEMU).
func (d *Daemon) killMemoryServers() {
	if names, err := Domains(""); err == nil {
		for _, n := range names {
			if xml, err := Virsh("dumpxml", n); err == nil && strings.Contains(xml, d.Config.StateDir+"/") {
				_, _ = Virsh("destroy", n)
				_, _ = Virsh("undefine", n)
			}
		}
	}
	marker := "-config " + filepath.Join(d.Config.StateDir, "vms") + "/"
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), marker) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(p, "/proc/%d/cmdline", &pid); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], d.Config.StateDir+"/") {
			_ = syscall.Unmount(f[1], syscall.MNT_DETACH)
		}
	}
}

// ConfigPath is the daemon's configuration file.
func (d *Daemon) ConfigPath() string { return filepath.Join(d.Dir, "hostd.toml") }

// LogPath is where the daemon's stderr goes (appended across restarts).
func (d *Daemon) LogPath() string { return filepath.Join(d.Dir, "hostd.log") }

func (d *Daemon) start() {
	d.tb.Helper()
	logf, err := os.OpenFile(d.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		d.tb.Fatal(err)
	}
	args := []string{filepath.Join(d.BinDir, "hostd"), "-config", d.ConfigPath()}
	if d.netns != "" {
		// nsenter execs hostd after entering the network namespace only:
		// the PID is hostd's, and unlike `ip netns exec` it keeps the
		// mount namespace, so the FUSE mounts of its memory servers are
		// the ones QEMU (libvirt's child, in the host's) maps.
		args = append([]string{"nsenter", "--net=/run/netns/" + d.netns}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), d.env...)
	// Its own process group: a kill -9 of the test's daemon hits nothing else.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		d.tb.Fatalf("start hostd: %v", err)
	}
	logf.Close()
	d.cmd, d.exited = cmd, make(chan error, 1)
	go func() { d.exited <- cmd.Wait() }()
	if err := d.WaitServing(60 * time.Second); err != nil {
		d.dumpLog()
		d.tb.Fatalf("hostd did not come up: %v", err)
	}
}

// WaitServing polls GET /v1/host until it answers (any HTTP status counts:
// a 503 still means the socket serves) or timeout passes.
func (d *Daemon) WaitServing(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case err := <-d.exited:
			d.exited <- err
			return fmt.Errorf("hostd exited: %v", err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := d.Client.Host(ctx)
		cancel()
		var ce *client.Error
		if err == nil || errors.As(err, &ce) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("no answer on %s within %v", d.Config.API.Socket, timeout)
}

// Kill9 kills the daemon with SIGKILL, as a crash would.
func (d *Daemon) Kill9() {
	d.tb.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
	d.cmd = nil
}

// PID is the running daemon's process ID (0 if stopped).
func (d *Daemon) PID() int {
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Stop ends the daemon gracefully (SIGTERM), waiting up to 30 s.
func (d *Daemon) Stop() error {
	if d.cmd == nil {
		return nil
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	var err error
	select {
	case err = <-d.exited:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		err = <-d.exited
		err = fmt.Errorf("hostd ignored SIGTERM for 30 s (killed): %v", err)
	}
	d.cmd = nil
	return err
}

// Reconfigure changes the configuration the next start (Restart, after a
// Stop or Kill9) reads.
func (d *Daemon) Reconfigure(edit func(*config.Config)) {
	d.tb.Helper()
	edit(&d.Config)
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(d.Config); err != nil {
		d.tb.Fatal(err)
	}
	if err := os.WriteFile(d.ConfigPath(), buf.Bytes(), 0o600); err != nil {
		d.tb.Fatal(err)
	}
}

// Restart starts a new daemon on the same state directory and socket.
func (d *Daemon) Restart() {
	d.tb.Helper()
	d.Stop()
	d.Client.Close()
	d.start()
}

// Exited reports whether the daemon process has ended, and how.
func (d *Daemon) Exited() (bool, error) {
	select {
	case err := <-d.exited:
		d.exited <- err
		return true, err
	default:
		return false, nil
	}
}

func (d *Daemon) dumpLog() {
	data, err := os.ReadFile(d.LogPath())
	if err != nil {
		return
	}
	lines := strings.Split(string(data), "\n")
	if len(lines) > 80 {
		lines = lines[len(lines)-80:]
	}
	d.tb.Logf("hostd log (last %d lines):\n%s", len(lines), strings.Join(lines, "\n"))
	// Memory servers log beside their VM's files.
	logs, _ := filepath.Glob(filepath.Join(d.Config.StateDir, "vms", "*", "memserver.log"))
	for _, p := range logs {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		lines := strings.Split(string(data), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		d.tb.Logf("%s (last %d lines):\n%s", p, len(lines), strings.Join(lines, "\n"))
	}
}

// Virsh runs virsh against the system libvirtd.
func Virsh(args ...string) (string, error) {
	out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system", "-q"}, args...)...).CombinedOutput()
	return string(out), err
}

// Domains lists the names of all libvirt domains starting with prefix.
func Domains(prefix string) ([]string, error) {
	out, err := Virsh("list", "--all", "--name")
	if err != nil {
		return nil, fmt.Errorf("virsh list: %w: %s", err, out)
	}
	var names []string
	for _, n := range strings.Fields(out) {
		if strings.HasPrefix(n, prefix) {
			names = append(names, n)
		}
	}
	return names, nil
}

// CleanupDomains destroys and undefines every domain whose name starts
// with prefix, so a failed test leaves no guest behind.
func CleanupDomains(tb testing.TB, prefix string) {
	tb.Helper()
	names, err := Domains(prefix)
	if err != nil {
		tb.Logf("cleanup: %v", err)
		return
	}
	for _, n := range names {
		_, _ = Virsh("destroy", n)
		_, _ = Virsh("undefine", n)
	}
}
