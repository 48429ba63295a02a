package integration

import (
	"fmt"
	"os"
	"os/exec"
	"testing"

	"hostd/hostd/hostdtest"
)

// binDir holds the hostd and hostctl built once for all tests.
var binDir string

// prefix names every domain these tests create, so cleanup finds them.
const prefix = "it-"

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("integration tests need root (libvirt qemu:///system, FUSE, netns); skipping")
		os.Exit(0)
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		fmt.Println("integration tests need libvirt: run `make provision` first")
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "hostd-bin")
	if err != nil {
		panic(err)
	}
	if binDir, err = hostdtest.Build(dir); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	// A run killed mid-test (a timeout, a CI abort) leaves its domains
	// defined in libvirt, which persists them: sweep them before starting.
	sweep()
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func sweep() {
	names, err := hostdtest.Domains(prefix)
	if err != nil {
		fmt.Println("sweep leftover domains:", err)
		return
	}
	for _, n := range names {
		_, _ = hostdtest.Virsh("destroy", n)
		_, _ = hostdtest.Virsh("undefine", n)
	}
}
