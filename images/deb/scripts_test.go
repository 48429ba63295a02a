package deb

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// version.sh gives a valid Debian version for every shape of git describe,
// ordered as the releases are: no tag before any release, a tag's later
// commits after the tag.
func TestVersionIsDebianValidAndOrdered(t *testing.T) {
	need(t, "git")
	need(t, "dpkg")
	repo := t.TempDir()
	git := func(args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-C", repo, "-c", "user.name=t", "-c", "user.email=t@localhost"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	version := func() string {
		t.Helper()
		cmd := exec.Command("bash", "version.sh", repo)
		cmd.Env = append(os.Environ(), "HOSTD_VERSION=")
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("version.sh: %v", err)
		}
		v := strings.TrimSpace(string(out))
		if out, err := exec.Command("dpkg", "--validate-version", v).CombinedOutput(); err != nil {
			t.Fatalf("version.sh printed %q, not a Debian version: %s", v, out)
		}
		return v
	}
	git("init", "-q")
	git("commit", "-q", "--allow-empty", "-m", "one")
	untagged := version()
	git("tag", "v1.2.3")
	tagged := version()
	git("commit", "-q", "--allow-empty", "-m", "two")
	after := version()
	if err := os.WriteFile(filepath.Join(repo, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	git("add", "f")
	dirty := version()
	git("commit", "-q", "-m", "three")
	git("tag", "release/next") // a tag that is no version
	odd := version()

	if tagged != "1.2.3" {
		t.Errorf("at tag v1.2.3: %q, want 1.2.3", tagged)
	}
	if !strings.HasPrefix(untagged, "0.0~git1.") || !strings.HasPrefix(after, "1.2.3+git1.") || !strings.HasSuffix(dirty, ".dirty") {
		t.Errorf("untagged %q, after the tag %q, dirty %q", untagged, after, dirty)
	}
	for _, pair := range [][2]string{{untagged, tagged}, {tagged, after}} {
		if err := exec.Command("dpkg", "--compare-versions", pair[0], "lt", pair[1]).Run(); err != nil {
			t.Errorf("%s should sort before %s", pair[0], pair[1])
		}
	}
	if odd == "" || odd == tagged {
		t.Errorf("a non-version tag gave %q", odd)
	}
	t.Logf("untagged %s, tagged %s, after %s, dirty %s, odd tag %s", untagged, tagged, after, dirty, odd)
}

// make install (install.sh) with PREFIX=/usr/local installs every listed
// file under that prefix, points the units and the configuration's guest at
// it, and never overwrites an edited configuration.
func TestInstallPrefixAndKeptConfig(t *testing.T) {
	bin, guest, dest := t.TempDir(), t.TempDir(), t.TempDir()
	for _, f := range []string{filepath.Join(bin, "hostd"), filepath.Join(bin, "hostctl"),
		filepath.Join(guest, "vmlinuz"), filepath.Join(guest, "initrd.img"), filepath.Join(guest, "guest.json")} {
		if err := os.WriteFile(f, []byte("stand-in\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	install := func() string {
		t.Helper()
		out, err := exec.Command("bash", "install.sh", dest, "/usr/local", bin, guest).CombinedOutput()
		if err != nil {
			t.Fatalf("install.sh: %v\n%s", err, out)
		}
		return string(out)
	}
	install()
	for _, l := range fileList(t) {
		p := l.dst
		if !strings.HasPrefix(p, "/etc/") {
			p = "/usr/local" + strings.TrimPrefix(p, "/usr")
		}
		fi, err := os.Stat(filepath.Join(dest, p))
		if err != nil {
			t.Errorf("%s not installed: %v", p, err)
			continue
		}
		if want := map[string]os.FileMode{"0755": 0o755, "0644": 0o644}[l.mode]; fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", p, fi.Mode().Perm(), want)
		}
	}
	for file, want := range map[string]string{
		"usr/local/lib/systemd/system/hostd.service":            "ExecStart=/usr/local/bin/hostd -config",
		"usr/local/lib/systemd/system/hostd-memserver@.service": "ExecStart=/usr/local/bin/hostd memserve",
		"etc/hostd/hostd.toml":                                  `kernel = "/usr/local/lib/hostd/guest/vmlinuz"`,
	} {
		b, err := os.ReadFile(filepath.Join(dest, file))
		if err != nil || !strings.Contains(string(b), want) || strings.Contains(string(b), "/usr/bin/hostd") {
			t.Errorf("%s: want %q and no /usr/bin/hostd (err %v):\n%s", file, want, err, b)
		}
	}
	conf := filepath.Join(dest, "etc/hostd/hostd.toml")
	if out := install(); strings.Contains(out, "keeping") {
		t.Errorf("a second install of an unchanged configuration kept it aside:\n%s", out)
	}
	edited := []byte("# the operator's\n")
	if err := os.WriteFile(conf, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	install()
	if b, _ := os.ReadFile(conf); string(b) != string(edited) {
		t.Errorf("make install overwrote an edited %s", conf)
	}
	if _, err := os.Stat(conf + ".new"); err != nil {
		t.Errorf("the shipped configuration is not beside the edited one: %v", err)
	}
}

// The bash completion completes commands, subcommands and flags.
func TestBashCompletion(t *testing.T) {
	need(t, "bash")
	for _, c := range []struct {
		words string
		want  string
	}{
		{"hostctl ev", "evacuate evacuate-host events"},
		{"hostctl -json vm cr", "create"},
		{"hostctl vm create web -mem", "-memory"},
		{"hostctl evacuate web -after d", "destroy"},
		{"hostctl job w", "wait"},
		{"hostctl -vers", "-version"},
	} {
		script := `source ./hostctl.bash; COMP_WORDS=(` + c.words + `); ` +
			`[[ "` + c.words + `" == *" " ]] && COMP_WORDS+=(""); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _hostctl; echo "${COMPREPLY[*]}"`
		out, err := exec.Command("bash", "-c", script).CombinedOutput()
		if err != nil {
			t.Fatalf("completion of %q: %v\n%s", c.words, err, out)
		}
		if got := strings.TrimSpace(string(out)); got != c.want {
			t.Errorf("completion of %q: %q, want %q", c.words, got, c.want)
		}
	}
}
