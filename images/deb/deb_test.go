package deb

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"hostd/hostd/config"
	"hostd/hostd/hostdtest"
	"hostd/images/guest/guestimage"
)

// listed is one line of files.list.
type listed struct {
	mode, src, dst string
	conffile       bool
}

// fileList reads files.list with PREFIX=/usr, as the package has it.
func fileList(t *testing.T) []listed {
	t.Helper()
	f, err := os.Open("files.list")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []listed
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 || strings.HasPrefix(fs[0], "#") {
			continue
		}
		if len(fs) < 3 {
			t.Fatalf("files.list: malformed line %q", sc.Text())
		}
		l := listed{mode: fs[0], src: fs[1], dst: strings.Replace(fs[2], "$PREFIX", "/usr", 1)}
		l.conffile = len(fs) > 3 && strings.Contains(","+fs[3]+",", ",conffile,")
		out = append(out, l)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func need(t *testing.T, tool string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Skipf("%s not installed (apt-get install dpkg; make test-deb installs what it needs): %v", tool, err)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

var (
	buildOnce      sync.Once
	buildDir       string // removed after the tests
	builtDeb, vers string
	buildErr       string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// theDeb is the package under test and the version it must carry: the one
// $HOSTD_DEB names, or one built here as `make deb` does (binaries stamped
// with version.sh's version, the test guest from build/guest).
func theDeb(t *testing.T) (deb, version string) {
	t.Helper()
	need(t, "dpkg-deb")
	if p := os.Getenv("HOSTD_DEB"); p != "" {
		v := strings.TrimSpace(run(t, "dpkg-deb", "-f", p, "Version"))
		if want := "hostd_" + v + "_amd64.deb"; filepath.Base(p) != want {
			t.Errorf("HOSTD_DEB is named %s; a package of version %s is %s", filepath.Base(p), v, want)
		}
		return p, v
	}
	img := guestimage.Require(t)
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hostd-deb")
		if err != nil {
			buildErr = err.Error()
			return
		}
		buildDir = dir
		out, err := exec.Command("bash", "version.sh").Output()
		if err != nil {
			buildErr = "version.sh: " + err.Error()
			return
		}
		vers = strings.TrimSpace(string(out))
		bin := filepath.Join(dir, "bin")
		build := exec.Command("go", "build", "-ldflags", "-X main.version="+vers, "-o", bin+"/", "hostd/hostd/cmd/hostd", "hostd/hostd/cmd/hostctl")
		if out, err := build.CombinedOutput(); err != nil {
			buildErr = "go build: " + err.Error() + "\n" + string(out)
			return
		}
		out, err = exec.Command("bash", "build.sh", dir, vers, bin, img.Dir).CombinedOutput()
		if err != nil {
			buildErr = "build.sh: " + err.Error() + "\n" + string(out)
			return
		}
		builtDeb = strings.TrimSpace(string(out))
	})
	if buildErr != "" {
		t.Fatalf("build the .deb: %s", buildErr)
	}
	return builtDeb, vers
}

// The control file names the package, its version and architecture, the
// Debian packages hostd needs at run time, the configuration as a conffile,
// and the maintainer scripts.
func TestControlFields(t *testing.T) {
	deb, version := theDeb(t)
	want := map[string]string{"Package": "hostd", "Version": version, "Architecture": "amd64"}
	for field, v := range want {
		if got := strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, field)); got != v {
			t.Errorf("%s: %s is %q, want %q", deb, field, got, v)
		}
	}
	if !strings.HasSuffix(deb, "/hostd_"+version+"_amd64.deb") {
		t.Errorf("package file %s is not named hostd_%s_amd64.deb", deb, version)
	}
	deps := map[string]bool{}
	for _, d := range strings.Split(run(t, "dpkg-deb", "-f", deb, "Depends"), ",") {
		deps[strings.Fields(d)[0]] = true
	}
	for _, d := range []string{"libvirt-daemon-system", "qemu-system-x86", "fuse3", "libvirt0", "libc6"} {
		if !deps[d] {
			t.Errorf("Depends lacks %s (has %v)", d, deps)
		}
	}
	var conffiles []string
	for _, l := range fileList(t) {
		if l.conffile {
			conffiles = append(conffiles, l.dst)
		}
	}
	if got := strings.Fields(run(t, "dpkg-deb", "-I", deb, "conffiles")); strings.Join(got, " ") != strings.Join(conffiles, " ") || len(got) == 0 {
		t.Errorf("conffiles %v, want %v (the conffile lines of files.list)", got, conffiles)
	}
	info := run(t, "dpkg-deb", "-I", deb)
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		if !strings.Contains(info, " "+s) {
			t.Errorf("dpkg-deb -I shows no %s:\n%s", s, info)
		}
	}
}

// The package holds exactly the files of files.list, with their modes,
// owned by root (the list `make install` uses is the package's), and its
// changelog.
func TestContentsAreTheFileList(t *testing.T) {
	deb, version := theDeb(t)
	type entry struct{ perm, owner string }
	have := map[string]entry{}
	for _, line := range strings.Split(run(t, "dpkg-deb", "-c", deb), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || !strings.HasPrefix(f[0], "-") {
			continue // directories
		}
		have[strings.TrimPrefix(f[5], ".")] = entry{f[0], f[1]}
	}
	list := fileList(t)
	modes := map[string]string{"0755": "-rwxr-xr-x", "0644": "-rw-r--r--"}
	for _, l := range list {
		e, ok := have[l.dst]
		if !ok {
			t.Errorf("%s (from %s) is not in the package", l.dst, l.src)
			continue
		}
		if e.perm != modes[l.mode] || e.owner != "root/root" {
			t.Errorf("%s is %s %s, want %s root/root", l.dst, e.perm, e.owner, modes[l.mode])
		}
		delete(have, l.dst)
	}
	// The one file of the package's own: its changelog, which names it.
	const changelog = "/usr/share/doc/hostd/changelog.gz"
	if _, ok := have[changelog]; !ok {
		t.Errorf("the package has no %s", changelog)
	} else if text := run(t, "sh", "-c", "dpkg-deb --fsys-tarfile '"+deb+"' | tar -xOf - ."+changelog+" | gzip -dc"); !strings.HasPrefix(text, "hostd ("+version+") ") {
		t.Errorf("%s does not start with this version's entry:\n%s", changelog, text)
	}
	delete(have, changelog)
	for p := range have {
		t.Errorf("%s is in the package but not in files.list", p)
	}
}

// dpkg installs the package into an empty root (maintainer scripts run
// with DPKG_ROOT, as in an image build without a running systemd): the
// group, hostd's directories and the unit's enablement are there, the
// installed binaries print the package's version, the installed hostd
// serves its socket with the shipped configuration (only its state and
// socket paths moved), the installed hostctl boots a VM of the packaged
// test guest through it to its guest agent, and a purge removes what the
// package brought but keeps hostd's state.
func TestInstallIntoFreshRoot(t *testing.T) {
	deb, version := theDeb(t)
	need(t, "dpkg")
	if os.Geteuid() != 0 {
		t.Skip("dpkg --root needs root to own the installed files (make test-deb runs as root)")
	}
	root := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log", "etc"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "var/lib/dpkg/status"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	dpkg := func(args ...string) string {
		t.Helper()
		return run(t, "dpkg", append([]string{"--root=" + root, "--force-script-chrootless", "--force-depends", "--log=/dev/null"}, args...)...)
	}
	dpkg("-i", deb)
	if st := run(t, "dpkg", "--root="+root, "-s", "hostd"); !strings.Contains(st, "Status: install ok installed") || !strings.Contains(st, "Version: "+version) {
		t.Fatalf("dpkg -s hostd after install:\n%s", st)
	}

	// postinst: sysusers, tmpfiles and the enablement, inside the root.
	checkConfigured(t, root)

	bin := filepath.Join(root, "usr/bin")
	for _, args := range [][]string{{"hostd", "-version"}, {"hostctl", "--version"}, {"hostctl", "version"}} {
		if got := strings.TrimSpace(run(t, filepath.Join(bin, args[0]), args[1:]...)); got != version {
			t.Errorf("installed %s prints %q, want the package version %q", strings.Join(args, " "), got, version)
		}
	}

	// The shipped configuration's guest is the packaged one.
	shipped, err := config.Load(filepath.Join(root, "etc/hostd/hostd.toml"), false)
	if err != nil {
		t.Fatalf("shipped /etc/hostd/hostd.toml: %v", err)
	}
	for _, p := range []string{shipped.Guest.Kernel, shipped.Guest.Initrd} {
		if !strings.HasPrefix(p, "/usr/lib/hostd/guest/") {
			t.Errorf("shipped config's guest %s is not under /usr/lib/hostd/guest", p)
		}
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("shipped config names %s, which the package does not install: %v", p, err)
		}
	}
	startInstalled(t, bin, root, shipped, version)

	dpkg("-P", "hostd")
	for _, l := range fileList(t) {
		if _, err := os.Stat(filepath.Join(root, l.dst)); err == nil {
			t.Errorf("%s is still there after a purge", l.dst)
		}
	}
	if _, err := os.Lstat(filepath.Join(root, "etc/systemd/system/multi-user.target.wants/hostd.service")); err == nil {
		t.Error("hostd.service is still enabled after a purge")
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/hostd")); err != nil {
		t.Errorf("a purge must keep /var/lib/hostd (guests' state): %v", err)
	}
}

// checkConfigured checks what postinst configure leaves in root: the
// hostd group, /var/lib/hostd and /run/hostd as 0750 root:hostd
// directories (the group's ID as root's /etc/group has it), and
// hostd.service enabled.
func checkConfigured(t *testing.T, root string) {
	t.Helper()
	gid := groupID(t, filepath.Join(root, "etc/group"), "hostd")
	for _, d := range []string{"var/lib/hostd", "run/hostd"} {
		fi, err := os.Stat(filepath.Join(root, d))
		if err != nil {
			t.Errorf("postinst did not create /%s: %v", d, err)
			continue
		}
		st, _ := fi.Sys().(*syscall.Stat_t)
		if !fi.IsDir() || fi.Mode().Perm() != 0o750 || st == nil || st.Uid != 0 || int(st.Gid) != gid {
			t.Errorf("postinst: /%s is %v (uid/gid %v), want a 0750 directory of root:hostd (gid %d in the root)", d, fi.Mode(), st, gid)
		}
	}
	if _, err := os.Lstat(filepath.Join(root, "etc/systemd/system/multi-user.target.wants/hostd.service")); err != nil {
		t.Errorf("postinst did not enable hostd.service in the root: %v", err)
	}
}

// groupID is a group's ID in a group file; the test fails if it is absent.
func groupID(t *testing.T, file, name string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("postinst did not create group %s: %v", name, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) >= 3 && f[0] == name {
			id, err := strconv.Atoi(f[2])
			if err != nil {
				t.Fatalf("%s: group %s has ID %q: %v", file, name, f[2], err)
			}
			return id
		}
	}
	t.Fatalf("postinst did not create group %s in %s:\n%s", name, file, b)
	return 0
}

// startInstalled starts the installed hostd with the shipped configuration,
// its state and socket moved to scratch paths and its guest the packaged
// one inside root, checks that its socket answers GET /v1/host with the
// package's version, and boots a VM with the installed hostctl.
func startInstalled(t *testing.T, bin, root string, shipped config.Config, version string) {
	t.Helper()
	if _, err := hostdtest.Virsh("version"); err != nil {
		t.Fatalf("libvirtd does not answer (make provision starts it): %v", err)
	}
	d := hostdtest.Start(t, bin, hostdtest.Options{Edit: func(c *config.Config) {
		s := shipped
		s.StateDir, s.RunDir, s.API.Socket = c.StateDir, c.RunDir, c.API.Socket
		s.Guest.Kernel = filepath.Join(root, shipped.Guest.Kernel)
		s.Guest.Initrd = filepath.Join(root, shipped.Guest.Initrd)
		s.Hypervisor.Accel = c.Hypervisor.Accel // tcg: the auto probe costs a guest boot
		s.Log = c.Log
		*c = s
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	h, err := d.Client.Host(ctx)
	if err != nil {
		t.Fatalf("GET /v1/host on the installed hostd: %v", err)
	}
	if h.Version != version {
		t.Errorf("installed hostd reports version %q, want %q", h.Version, version)
	}
	if h.Hypervisor == "" || h.CPUs == 0 {
		t.Errorf("installed hostd's host info is empty: %+v", h)
	}
	t.Logf("installed hostd %s serves on %s (hypervisor %s, accel %s)", h.Version, d.Config.API.Socket, h.Hypervisor, h.Accel)

	// The README's quick start with the installed hostctl: a VM on the
	// configuration's default guest (the packaged one) boots to its agent.
	const name = "debpkg-boot"
	t.Cleanup(func() { hostdtest.CleanupDomains(t, "debpkg-") })
	hostctl := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(filepath.Join(bin, "hostctl"), append([]string{"-socket", d.Config.API.Socket}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("installed hostctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	hostctl("vm", "create", name, "-memory", "128")
	hostctl("vm", "wait-ready", name, "-timeout", "3m")
	got := hostctl("-json", "vm", "get", name)
	if !strings.Contains(got, filepath.Join(root, shipped.Guest.Kernel)) {
		t.Errorf("the VM did not boot the packaged guest %s:\n%s", shipped.Guest.Kernel, got)
	}
	t.Logf("VM %s of the packaged guest ready: %s", name, got)
	hostctl("vm", "destroy", name)
	hostctl("vm", "delete", name)
}

// The package's postinst does without systemd-sysusers and
// systemd-tmpfiles (a minimal chroot or image root): it creates the group
// and hostd's directories itself, with the group ID of the root it installs
// into, and still enables the unit there. It runs as dpkg runs it with
// --force-script-chrootless, on a PATH without systemd's tools.
func TestPostinstWithoutSystemdTools(t *testing.T) {
	deb, _ := theDeb(t)
	control := t.TempDir()
	run(t, "dpkg-deb", "-e", deb, control)
	root, path := t.TempDir(), t.TempDir()
	run(t, "dpkg-deb", "-x", deb, root) // as dpkg unpacks before it configures
	// The root's own group file: a postinst that resolved "hostd" on this
	// machine rather than in the root would give the directories a wrong
	// group (or none), which checkConfigured sees.
	if err := os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nother:x:998:\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tool := range []string{"sh", "awk", "grep", "groupadd", "install", "deb-systemd-helper"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("%s not installed (it is part of every Debian system): %v", tool, err)
		}
		if err := os.Symlink(p, filepath.Join(path, tool)); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(filepath.Join(path, "sh"), filepath.Join(control, "postinst"), "configure", "")
	cmd.Env = []string{"PATH=" + path, "DPKG_ROOT=" + root, "DPKG_MAINTSCRIPT_PACKAGE=hostd", "DPKG_MAINTSCRIPT_NAME=postinst"}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("postinst configure without systemd's tools: %v\n%s", err, out)
	}
	checkConfigured(t, root)
}
