package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func need(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Skipf("%s not installed (apt-get install systemd): %v", tool, err)
	}
	return p
}

// The unit must pass systemd-analyze verify with no warning about itself.
// verify wants ExecStart's binary to exist, so hostd is built and the unit
// copied with ExecStart pointing at it; systemd need not be PID 1.
func TestServiceUnitVerifies(t *testing.T) {
	analyze := need(t, "systemd-analyze")
	dir := t.TempDir()
	bin := filepath.Join(dir, "hostd")
	build := exec.Command("go", "build", "-o", bin, "hostd/hostd/cmd/hostd")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build hostd: %v\n%s", err, out)
	}
	unit, err := os.ReadFile("hostd.service")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/bin/hostd ") {
		t.Fatal("hostd.service: ExecStart must start /usr/bin/hostd")
	}
	for _, want := range []string{"Type=notify", "WatchdogSec=", "Restart=on-failure", "RuntimeDirectoryPreserve=yes", "DeviceAllow=/dev/fuse rw"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("hostd.service lacks %q", want)
		}
	}
	copyPath := filepath.Join(dir, "hostd.service")
	if err := os.WriteFile(copyPath, []byte(strings.ReplaceAll(string(unit), "/usr/bin/hostd", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	verify(t, analyze, copyPath, "hostd.service")

	// The memory server template, instantiated.
	ms, err := os.ReadFile("hostd-memserver@.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ExecStart=/usr/bin/hostd memserve -config /var/lib/hostd/vms/%i/memserver.json", "Restart=no"} {
		if !strings.Contains(string(ms), want) {
			t.Errorf("hostd-memserver@.service lacks %q", want)
		}
	}
	msPath := filepath.Join(dir, "hostd-memserver@vm1.service")
	if err := os.WriteFile(msPath, []byte(strings.ReplaceAll(string(ms), "/usr/bin/hostd", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	verify(t, analyze, msPath, "hostd-memserver@")
}

// verify runs systemd-analyze verify on a unit and fails on any warning
// that names it: unknown or malformed settings are only warnings (exit 0).
func verify(t *testing.T, analyze, path, name string) {
	t.Helper()
	out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", path, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, name) {
			t.Errorf("systemd-analyze verify warns: %s", line)
		}
	}
}

// sysusers and tmpfiles snippets applied to a scratch root create the group
// and the directories with the intended modes.
func TestSysusersAndTmpfiles(t *testing.T) {
	sysusers, tmpfiles := need(t, "systemd-sysusers"), need(t, "systemd-tmpfiles")
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"passwd", "group"} {
		if err := os.WriteFile(filepath.Join(root, "etc", f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	abs := func(f string) string { p, _ := filepath.Abs(f); return p }
	if out, err := exec.Command(sysusers, "--root="+root, abs("hostd.sysusers")).CombinedOutput(); err != nil {
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	group, _ := os.ReadFile(filepath.Join(root, "etc", "group"))
	if !strings.HasPrefix(string(group), "hostd:") {
		t.Fatalf("group file after sysusers: %q", group)
	}
	if out, err := exec.Command(tmpfiles, "--root="+root, "--create", abs("hostd.tmpfiles")).CombinedOutput(); err != nil {
		t.Fatalf("systemd-tmpfiles: %v\n%s", err, out)
	}
	for dir, mode := range map[string]os.FileMode{"var/lib/hostd": 0o750, "run/hostd": 0o750, "etc/hostd": 0o755} {
		st, err := os.Stat(filepath.Join(root, dir))
		if err != nil || st.Mode().Perm() != mode {
			t.Errorf("%s: %v mode %v, want %v", dir, err, st.Mode().Perm(), mode)
		}
	}
}
