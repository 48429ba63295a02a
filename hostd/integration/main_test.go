package integration

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"testing"

	"hostd/hostd/hostdtest"
	"hostd/hostd/vm"
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
	// Warm slots are named by hostd, not by the tests: a slot whose
	// hostd's state directory is gone is an orphan of a killed run (a live
	// hostd's, another test run's included, still has its directory).
	slots, _ := hostdtest.Domains(vm.SlotPrefix)
	for _, n := range slots {
		xml, err := hostdtest.Virsh("dumpxml", n)
		m := slotRAM.FindStringSubmatch(xml)
		if err != nil || m == nil {
			continue
		}
		if _, err := os.Stat(m[1]); os.IsNotExist(err) {
			_, _ = hostdtest.Virsh("destroy", n)
			_, _ = hostdtest.Virsh("undefine", n)
		}
	}
}

// slotRAM finds the test daemon's scratch root in a slot's XML: its
// files are under ROOT/state/vms/.
var slotRAM = regexp.MustCompile(`(/[^"'<>\s;&]+)/state/vms/`)
