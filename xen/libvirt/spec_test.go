package libvirt

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"hostd/xen"
)

// specFixture is a valid spec over real files in a temp dir.
func specFixture(t *testing.T) (xen.DomainSpec, string) {
	dir := t.TempDir()
	for _, f := range []string{"vmlinuz", "initrd", "disk.raw"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return xen.DomainSpec{
		Name:        "t-xen-unit",
		VCPUs:       1,
		MemoryMiB:   256,
		Kernel:      filepath.Join(dir, "vmlinuz"),
		Initrd:      filepath.Join(dir, "initrd"),
		Cmdline:     "console=ttyS0",
		Disks:       []xen.Disk{{Path: filepath.Join(dir, "disk.raw")}},
		NICs:        []xen.NIC{{Tap: "tapx0", MAC: "52:54:00:aa:bb:cc", MTU: 1500}},
		RAMPath:     filepath.Join(dir, "ram"),
		SerialLog:   filepath.Join(dir, "serial.log"),
		AgentSocket: filepath.Join(dir, "agent.sock"),
	}, dir
}

var testLimits = limits{CPUs: 2, MemoryMiB: 4096}

func TestValidateSpecAcceptsFixture(t *testing.T) {
	s, _ := specFixture(t)
	if err := validateSpec(s, testLimits); err != nil {
		t.Fatalf("valid spec refused: %v", err)
	}
	// A disk-only spec boots from its first disk.
	s.Kernel, s.Initrd, s.Cmdline = "", "", ""
	if err := validateSpec(s, testLimits); err != nil {
		t.Fatalf("disk boot refused: %v", err)
	}
}

func TestValidateSpecRejects(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*xen.DomainSpec, string)
		want   string // a fragment of the reason
	}{
		{"empty name", func(s *xen.DomainSpec, _ string) { s.Name = "" }, "name is empty"},
		{"long name", func(s *xen.DomainSpec, _ string) { s.Name = strings.Repeat("a", 65) }, "at most 64"},
		{"name charset", func(s *xen.DomainSpec, _ string) { s.Name = "a/b" }, "use letters, digits"},
		{"name leading dash", func(s *xen.DomainSpec, _ string) { s.Name = "-a" }, "starting with a letter"},
		{"bad uuid", func(s *xen.DomainSpec, _ string) { s.UUID = "1234" }, "uuid"},
		{"zero vcpus", func(s *xen.DomainSpec, _ string) { s.VCPUs = 0 }, "vcpus 0: must be 1..2"},
		{"too many vcpus", func(s *xen.DomainSpec, _ string) { s.VCPUs = 3 }, "vcpus 3"},
		{"tiny memory", func(s *xen.DomainSpec, _ string) { s.MemoryMiB = 8 }, "memory_mib 8"},
		{"huge memory", func(s *xen.DomainSpec, _ string) { s.MemoryMiB = 8192 }, "memory_mib 8192"},
		{"nothing to boot", func(s *xen.DomainSpec, _ string) { s.Kernel, s.Initrd, s.Cmdline, s.Disks = "", "", "", nil }, "nothing to boot"},
		{"initrd without kernel", func(s *xen.DomainSpec, _ string) { s.Kernel, s.Cmdline = "", "" }, "without a kernel"},
		{"missing kernel", func(s *xen.DomainSpec, d string) { s.Kernel = filepath.Join(d, "nope") }, "no such file"},
		{"relative kernel", func(s *xen.DomainSpec, _ string) { s.Kernel = "vmlinuz" }, "absolute path"},
		{"kernel is a dir", func(s *xen.DomainSpec, d string) { s.Kernel = d }, "not a regular file"},
		{"missing initrd", func(s *xen.DomainSpec, d string) { s.Initrd = filepath.Join(d, "nope") }, "initrd"},
		{"missing disk", func(s *xen.DomainSpec, d string) { s.Disks[0].Path = filepath.Join(d, "nope") }, "disks[0].path"},
		{"disk path and nbd", func(s *xen.DomainSpec, d string) { s.Disks[0].NBDSocket = filepath.Join(d, "nbd.sock") }, "not both"},
		{"disk without source", func(s *xen.DomainSpec, _ string) { s.Disks[0].Path = "" }, "give a path"},
		{"disk format", func(s *xen.DomainSpec, _ string) { s.Disks[0].Format = "vmdk" }, "use raw or qcow2"},
		{"disk target", func(s *xen.DomainSpec, _ string) { s.Disks[0].Target = "sda" }, "virtio names"},
		{"duplicate target", func(s *xen.DomainSpec, _ string) {
			s.Disks[0].Target = "vdb"
			s.Disks = append(s.Disks, s.Disks[0])
		}, "used twice"},
		{"nbd socket too long", func(s *xen.DomainSpec, d string) {
			s.Disks[0] = xen.Disk{NBDSocket: "/" + strings.Repeat("s", 120)}
		}, "at most 107"},
		{"export without socket", func(s *xen.DomainSpec, _ string) { s.Disks[0].NBDExport = "x" }, "without nbd_socket"},
		{"reconnect without socket", func(s *xen.DomainSpec, _ string) { s.Disks[0].NBDReconnectDelay = 5 }, "nbd_reconnect_delay given without"},
		{"bad serial", func(s *xen.DomainSpec, _ string) { s.Disks[0].Serial = "has space" }, "serial"},
		{"serial too long", func(s *xen.DomainSpec, _ string) { s.Disks[0].Serial = strings.Repeat("s", 21) }, "1 to 20"},
		{"tap too long", func(s *xen.DomainSpec, _ string) { s.NICs[0].Tap = "abcdefghijklmnop" }, "1 to 15"},
		{"tap empty", func(s *xen.DomainSpec, _ string) { s.NICs[0].Tap = "" }, "1 to 15"},
		{"tap reserved", func(s *xen.DomainSpec, _ string) { s.NICs[0].Tap = "vnet3" }, "reserved by libvirt"},
		{"tap twice", func(s *xen.DomainSpec, _ string) { s.NICs = append(s.NICs, xen.NIC{Tap: "tapx0"}) }, "tap \"tapx0\" used twice"},
		{"bad mac", func(s *xen.DomainSpec, _ string) { s.NICs[0].MAC = "52:54:00:zz:00:01" }, "not a 6-byte MAC"},
		{"multicast mac", func(s *xen.DomainSpec, _ string) { s.NICs[0].MAC = "01:00:5e:00:00:01" }, "multicast"},
		{"mac twice", func(s *xen.DomainSpec, _ string) {
			s.NICs = append(s.NICs, xen.NIC{Tap: "tapx1", MAC: "52:54:00:AA:BB:CC"})
		}, "used twice"},
		{"mtu", func(s *xen.DomainSpec, _ string) { s.NICs[0].MTU = 20 }, "mtu 20"},
		{"no ram path", func(s *xen.DomainSpec, _ string) { s.RAMPath = "" }, "ram_path is empty"},
		{"ram dir missing", func(s *xen.DomainSpec, d string) { s.RAMPath = filepath.Join(d, "no", "ram") }, "create it first"},
		{"ram is a dir", func(s *xen.DomainSpec, d string) { s.RAMPath = d }, "not a regular file"},
		{"ram file too big", func(s *xen.DomainSpec, d string) {
			p := filepath.Join(d, "bigram")
			os.WriteFile(p, nil, 0o644)
			os.Truncate(p, 512<<20)
			s.RAMPath = p
		}, "larger than memory_mib"},
		{"serial dir missing", func(s *xen.DomainSpec, d string) { s.SerialLog = filepath.Join(d, "no", "log") }, "serial_log"},
		{"agent relative", func(s *xen.DomainSpec, _ string) { s.AgentSocket = "agent.sock" }, "agent_socket"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, dir := specFixture(t)
			c.mutate(&s, dir)
			err := validateSpec(s, testLimits)
			if !errors.Is(err, xen.ErrInvalidSpec) {
				t.Fatalf("want ErrInvalidSpec, got %v", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("reason %q does not mention %q", err, c.want)
			}
		})
	}
}

func TestValidateSpecReportsAllProblems(t *testing.T) {
	s, _ := specFixture(t)
	s.VCPUs, s.MemoryMiB, s.RAMPath = 0, 1, ""
	err := validateSpec(s, testLimits)
	for _, frag := range []string{"vcpus", "memory_mib", "ram_path"} {
		if !strings.Contains(err.Error(), frag) {
			t.Errorf("%q does not mention %s", err, frag)
		}
	}
}

func TestNormalize(t *testing.T) {
	s, _ := specFixture(t)
	s.Disks = []xen.Disk{{Path: "/a"}, {Path: "/b", Target: "vda"}, {Path: "/c", Format: "qcow2"}}
	s.NICs = []xen.NIC{{Tap: "t0"}, {Tap: "t1", MAC: "52:54:00:AA:BB:CC"}}
	orig := s.Disks[0]
	n, err := normalize(s)
	if err != nil {
		t.Fatal(err)
	}
	if !uuidRE.MatchString(n.UUID) || n.UUID != strings.ToLower(n.UUID) {
		t.Errorf("uuid %q", n.UUID)
	}
	if got := []string{n.Disks[0].Target, n.Disks[1].Target, n.Disks[2].Target}; got[0] != "vdb" || got[1] != "vda" || got[2] != "vdc" {
		t.Errorf("targets %v, want [vdb vda vdc]", got)
	}
	if n.Disks[0].Format != "raw" || n.Disks[2].Format != "qcow2" {
		t.Errorf("formats %q %q", n.Disks[0].Format, n.Disks[2].Format)
	}
	if !strings.HasPrefix(n.NICs[0].MAC, "52:54:00:") || n.NICs[1].MAC != "52:54:00:aa:bb:cc" {
		t.Errorf("macs %q %q", n.NICs[0].MAC, n.NICs[1].MAC)
	}
	if s.Disks[0] != orig || s.NICs[0].MAC != "" {
		t.Error("normalize changed the caller's slices")
	}
	if err := validateSpec(n, testLimits); err == nil || strings.Contains(err.Error(), "mac") || strings.Contains(err.Error(), "target") {
		// The fixture's disk paths do not exist, so it is invalid, but
		// not for what normalize filled in.
		t.Errorf("normalised spec: %v", err)
	}
	m, _ := normalize(s)
	if m.UUID == n.UUID || m.NICs[0].MAC == n.NICs[0].MAC {
		t.Error("two normalisations drew the same uuid or mac")
	}
}

func TestDiskTarget(t *testing.T) {
	for i, want := range map[int]string{0: "vda", 25: "vdz", 26: "vdaa", 27: "vdab", 52: "vdba"} {
		if got := diskTarget(i); got != want {
			t.Errorf("diskTarget(%d) = %q, want %q", i, got, want)
		}
	}
}

// CheckSpec, which hostd calls before it makes a VM's directories, judges
// what was asked for and not the files hostd has yet to place.
func TestCheckSpecBeforeTheFilesExist(t *testing.T) {
	s, dir := specFixture(t)
	d := &Driver{lim: testLimits}
	gone := filepath.Join(dir, "not-yet")
	s.RAMPath, s.SerialLog, s.AgentSocket = filepath.Join(gone, "ram"), filepath.Join(gone, "serial.log"), filepath.Join(gone, "a.sock")
	if err := d.CheckSpec(s); err != nil {
		t.Fatalf("a good request refused for files hostd has not placed: %v", err)
	}
	if err := validateSpec(s, testLimits); err == nil {
		t.Fatal("Define's validation accepted missing directories")
	}
	s.NICs = []xen.NIC{{Tap: "vnet0"}}
	s.Disks = []xen.Disk{{Path: "relative.raw"}}
	err := d.CheckSpec(s)
	if !errors.Is(err, xen.ErrInvalidSpec) || !strings.Contains(err.Error(), "vnet") || !strings.Contains(err.Error(), "absolute") {
		t.Fatalf("bad NIC and disk: %v", err)
	}
}
