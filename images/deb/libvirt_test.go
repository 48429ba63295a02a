package deb

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// What README says of libvirt's set-up holds: with Debian's stock qemu.conf
// (QEMU as libvirt-qemu) the packaged hostd cannot start a VM, and with the
// two lines the package ships (/usr/share/hostd/libvirt-qemu.conf) appended
// it boots one to its guest agent, QEMU running as root. Each case runs a
// libvirtd of its own in a private mount namespace, so the machine's
// libvirtd is not touched.
func TestStockLibvirtNeedsOnlyTheShippedLines(t *testing.T) {
	deb, _ := theDeb(t)
	for _, tool := range []string{"unshare", "libvirtd", "virtlogd", "virsh"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (make provision installs libvirt): %v", tool, err)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("a libvirtd of its own needs root (make test-deb runs as root)")
	}
	root := t.TempDir()
	run(t, "dpkg-deb", "-x", deb, root)
	shipped, err := os.ReadFile(filepath.Join(root, "usr/share/hostd/libvirt-qemu.conf"))
	if err != nil {
		t.Fatalf("the package's libvirt setting: %v", err)
	}
	// Debian's qemu.conf sets nothing: every line of it is a comment.
	stock := []byte("# Debian's qemu.conf: all defaults\n")
	for _, c := range []struct {
		name  string
		conf  []byte
		boots bool
		says  string
	}{
		{"stock", stock, false, "Permission denied"},
		{"with the shipped lines", append(append([]byte{}, stock...), shipped...), true, "qemu runs as: root"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Short: the API socket's path must fit a sockaddr_un.
			scratch, err := os.MkdirTemp("", "hdq")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(scratch) })
			conf := filepath.Join(scratch, "qemu.conf")
			if err := os.WriteFile(conf, c.conf, 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("unshare", "-m", "--propagation", "private", "bash", "testdata/stock-libvirt.sh",
				conf, filepath.Join(root, "usr/bin"), filepath.Join(root, "usr/lib/hostd/guest"), scratch)
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code == 2 {
				log, _ := os.ReadFile(filepath.Join(scratch, "hostd.log"))
				t.Fatalf("set-up of a libvirtd of its own failed:\n%s\nhostd log:\n%s", out, log)
			}
			if booted := code == 0; booted != c.boots {
				t.Errorf("qemu.conf %q: VM booted %v, want %v:\n%s", c.conf, booted, c.boots, out)
			}
			t.Logf("%s", out)
			if !strings.Contains(string(out), c.says) {
				t.Errorf("output lacks %q:\n%s", c.says, out)
			}
		})
	}
}
