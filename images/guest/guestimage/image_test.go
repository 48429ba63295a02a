package guestimage

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBuildReproducibleAndCached builds the guest a second time into a
// fresh directory and expects byte-identical outputs, then builds again
// and expects the cache to answer.
func TestBuildReproducibleAndCached(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the guest from scratch")
	}
	shared := Require(t)
	out := t.TempDir()
	// Reuse the downloaded packages; the point is the build, not apt.
	if err := os.MkdirAll(filepath.Join(out, "debs"), 0o777); err != nil {
		t.Fatal(err)
	}
	debs, _ := filepath.Glob(filepath.Join(shared.Dir, "debs", "*.deb"))
	for _, d := range debs {
		b, err := os.ReadFile(d)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(out, "debs", filepath.Base(d)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	root, err := RepoRoot(shared.Dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var logged strings.Builder
	log := slog.New(slog.NewTextHandler(&logged, nil))

	start := time.Now()
	img, err := Build(ctx, log, root, out)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("measure: build with packages present %.2fs, initrd %d bytes", time.Since(start).Seconds(), img.Manifest.InitrdBytes)
	if img.Manifest.InitrdSHA256 != shared.Manifest.InitrdSHA256 || img.Manifest.VmlinuzSHA256 != shared.Manifest.VmlinuzSHA256 {
		t.Errorf("rebuild differs: initrd %s vs %s, vmlinuz %s vs %s", img.Manifest.InitrdSHA256, shared.Manifest.InitrdSHA256,
			img.Manifest.VmlinuzSHA256, shared.Manifest.VmlinuzSHA256)
	}

	logged.Reset()
	start = time.Now()
	if _, err := Build(ctx, log, root, out); err != nil {
		t.Fatal(err)
	}
	t.Logf("measure: cached build %.3fs", time.Since(start).Seconds())
	if !strings.Contains(logged.String(), "up to date") {
		t.Errorf("second build was not answered from the cache: %s", logged.String())
	}
}

func TestQEMUArgsAndErrors(t *testing.T) {
	img := Image{Kernel: "/k", Initrd: "/i"}
	args, err := img.QEMUArgs(BootConfig{SerialLog: "/s.log", AgentSocket: "/a.sock", Cmdline: "hostd.echo=7"})
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{"-accel tcg", "-m 256", "-kernel /k", "-initrd /i", "console=ttyS0 quiet panic=-1 hostd.echo=7",
		"file:/s.log", "path=/a.sock", "name=org.hostd.agent.0"} {
		if !strings.Contains(joined, want) {
			t.Errorf("args %q lack %q", joined, want)
		}
	}
	for _, c := range []BootConfig{{}, {SerialLog: "/a,b"}, {SerialLog: "/s", MemMiB: 16}} {
		if _, err := img.QEMUArgs(c); err == nil {
			t.Errorf("QEMUArgs(%+v): no error", c)
		}
	}
	if _, err := Load(t.TempDir()); err == nil || !strings.Contains(err.Error(), "load guest image") {
		t.Errorf("Load of an empty dir: %v", err)
	}
	if _, err := RepoRoot("/"); err == nil {
		t.Error("RepoRoot(/): no error")
	}
}
