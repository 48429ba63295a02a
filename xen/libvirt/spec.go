package libvirt

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"hostd/xen"
)

// limits are the host's bounds a spec is checked against.
type limits struct {
	CPUs      int
	MemoryMiB uint64
}

const (
	minMemoryMiB = 16
	maxNameLen   = 64
	// maxSocketPath is sun_path's size minus the terminating NUL.
	maxSocketPath = 107
)

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	// Linux interface names: at most IFNAMSIZ-1 = 15 bytes.
	tapRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`)
	targetRE = regexp.MustCompile(`^vd[a-z]{1,2}$`)
	// virtio-blk serials are at most 20 bytes.
	serialRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,20}$`)
	uuidRE   = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
)

// validateSpec checks everything libvirt or QEMU would otherwise reject late
// (or worse, accept and misbehave on), and reports all problems at once.
// The returned error wraps xen.ErrInvalidSpec.
func validateSpec(s xen.DomainSpec, lim limits) error { return checkSpec(s, lim, true) }

// CheckSpec implements xen.SpecChecker: what the user asked for (shape,
// boot source, disks, NICs), without the files hostd places (RAM, serial
// log, agent socket), whose directories do not exist yet.
func (d *Driver) CheckSpec(s xen.DomainSpec) error { return checkSpec(s, d.lim, false) }

func checkSpec(s xen.DomainSpec, lim limits, files bool) error {
	var p []string
	bad := func(format string, a ...any) { p = append(p, fmt.Sprintf(format, a...)) }

	switch {
	case s.Name == "":
		bad("name is empty")
	case len(s.Name) > maxNameLen:
		bad("name is %d characters, at most %d", len(s.Name), maxNameLen)
	case !nameRE.MatchString(s.Name):
		bad("name %q: use letters, digits, '.', '_' and '-', starting with a letter or digit", s.Name)
	}
	if s.UUID != "" && !uuidRE.MatchString(s.UUID) {
		bad("uuid %q is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (or leave it empty)", s.UUID)
	}
	if s.VCPUs < 1 || s.VCPUs > lim.CPUs {
		bad("vcpus %d: must be 1..%d (the host's CPUs)", s.VCPUs, lim.CPUs)
	}
	if s.MemoryMiB < minMemoryMiB || s.MemoryMiB > lim.MemoryMiB {
		bad("memory_mib %d: must be %d..%d (the host's memory)", s.MemoryMiB, minMemoryMiB, lim.MemoryMiB)
	}

	// Boot source.
	if s.Kernel == "" {
		if len(s.Disks) == 0 {
			bad("nothing to boot: give a kernel or at least one disk (the first disk boots)")
		}
		if s.Initrd != "" {
			bad("initrd %q given without a kernel", s.Initrd)
		}
		if s.Cmdline != "" {
			bad("cmdline given without a kernel")
		}
	} else {
		checkFile(bad, "kernel", s.Kernel)
		if s.Initrd != "" {
			checkFile(bad, "initrd", s.Initrd)
		}
	}

	targets := map[string]bool{}
	for i, dk := range s.Disks {
		what := fmt.Sprintf("disks[%d]", i)
		checkDiskSpec(bad, what, dk)
		if dk.Target != "" {
			if targets[dk.Target] {
				bad("%s: target %q used twice", what, dk.Target)
			}
			targets[dk.Target] = true
		}
	}

	taps, macs := map[string]bool{}, map[string]bool{}
	for i, n := range s.NICs {
		what := fmt.Sprintf("nics[%d]", i)
		switch {
		case !tapRE.MatchString(n.Tap):
			bad("%s: tap %q: 1 to 15 letters, digits, '.', '_' or '-'", what, n.Tap)
		case hasPrefixAny(n.Tap, "vnet", "macvtap", "macvlan", "vif"):
			// libvirt treats these as its own generated names and renames them.
			bad("%s: tap %q: names starting with vnet, macvtap, macvlan or vif are reserved by libvirt", what, n.Tap)
		case taps[n.Tap]:
			bad("%s: tap %q used twice", what, n.Tap)
		}
		taps[n.Tap] = true
		if n.MAC != "" {
			hw, err := net.ParseMAC(n.MAC)
			switch {
			case err != nil || len(hw) != 6:
				bad("%s: mac %q is not a 6-byte MAC like 52:54:00:12:34:56", what, n.MAC)
			case hw[0]&1 != 0:
				bad("%s: mac %q is multicast; the first byte must be even", what, n.MAC)
			case macs[hw.String()]:
				bad("%s: mac %q used twice", what, n.MAC)
			default:
				macs[hw.String()] = true
			}
		}
		if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
			bad("%s: mtu %d: must be 68..65535 (or 0 for the default)", what, n.MTU)
		}
	}

	switch {
	case !files:
	case s.RAMPath == "":
		bad("ram_path is empty: guest RAM must be backed by a file hostd chooses")
	case checkAbsParent(bad, "ram_path", s.RAMPath):
		if fi, err := os.Stat(s.RAMPath); err == nil {
			if !fi.Mode().IsRegular() {
				bad("ram_path %q exists and is not a regular file", s.RAMPath)
			} else if fi.Size() > int64(s.MemoryMiB)<<20 {
				bad("ram_path %q is %d bytes, larger than memory_mib (%d bytes): QEMU would refuse it", s.RAMPath, fi.Size(), int64(s.MemoryMiB)<<20)
			}
		}
	}
	if files && s.SerialLog != "" {
		checkAbsParent(bad, "serial_log", s.SerialLog)
	}
	if files && s.AgentSocket != "" {
		checkSocket(bad, "agent_socket", s.AgentSocket)
	}

	if len(p) > 0 {
		return fmt.Errorf("%w: %s", xen.ErrInvalidSpec, strings.Join(p, "; "))
	}
	return nil
}

func checkFile(bad func(string, ...any), what, path string) {
	if !filepath.IsAbs(path) {
		bad("%s %q: use an absolute path (libvirtd does not share hostd's working directory)", what, path)
		return
	}
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		bad("%s %q: %v", what, path, err)
	case !fi.Mode().IsRegular():
		bad("%s %q is not a regular file", what, path)
	}
}

func checkDisk(bad func(string, ...any), what, path string) {
	if !filepath.IsAbs(path) {
		bad("%s %q: use an absolute path", what, path)
		return
	}
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		bad("%s %q: %v", what, path, err)
	case !fi.Mode().IsRegular() && fi.Mode()&os.ModeDevice == 0:
		bad("%s %q is neither a file nor a block device", what, path)
	}
}

// checkAbsParent checks that path is absolute and its directory exists.
func checkAbsParent(bad func(string, ...any), what, path string) bool {
	if !filepath.IsAbs(path) {
		bad("%s %q: use an absolute path", what, path)
		return false
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if err != nil || !fi.IsDir() {
		bad("%s %q: directory %q does not exist; create it first", what, path, dir)
		return false
	}
	return true
}

func checkSocket(bad func(string, ...any), what, path string) {
	if len(path) > maxSocketPath {
		bad("%s %q is %d bytes, a unix socket path has at most %d", what, path, len(path), maxSocketPath)
		return
	}
	checkAbsParent(bad, what, path)
}

// normalize returns a copy of s with what the driver chooses filled in:
// UUID, MACs, disk targets and formats. The normalised spec is what is
// recorded in the domain's metadata, so it reads back the same.
func normalize(s xen.DomainSpec) (xen.DomainSpec, error) {
	if s.UUID == "" {
		u, err := randomUUID()
		if err != nil {
			return s, err
		}
		s.UUID = u
	}
	s.UUID = strings.ToLower(s.UUID)

	used := map[string]bool{}
	for _, dk := range s.Disks {
		used[dk.Target] = true
	}
	disks := make([]xen.Disk, len(s.Disks))
	next := 0
	for i, dk := range s.Disks {
		if dk.Format == "" {
			dk.Format = "raw"
		}
		for dk.Target == "" {
			t := diskTarget(next)
			next++
			if !used[t] {
				dk.Target = t
				used[t] = true
			}
		}
		disks[i] = dk
	}
	s.Disks = disks

	nics := make([]xen.NIC, len(s.NICs))
	for i, n := range s.NICs {
		if n.MAC == "" {
			m, err := randomMAC()
			if err != nil {
				return s, err
			}
			n.MAC = m
		} else {
			hw, _ := net.ParseMAC(n.MAC) // validated before
			n.MAC = hw.String()
		}
		nics[i] = n
	}
	s.NICs = nics
	if len(s.Disks) == 0 {
		s.Disks = nil
	}
	if len(s.NICs) == 0 {
		s.NICs = nil
	}
	return s, nil
}

// diskTarget names the i-th virtio disk: vda..vdz, vdaa, vdab, ...
func diskTarget(i int) string {
	const letters = "abcdefghijklmnopqrstuvwxyz"
	if i < 26 {
		return "vd" + letters[i:i+1]
	}
	i -= 26
	return "vd" + letters[i/26%26:i/26%26+1] + letters[i%26:i%26+1]
}

func randomUUID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate uuid: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32], nil
}

// randomMAC draws from QEMU's locally administered 52:54:00 prefix, the one
// libvirt uses too.
func randomMAC() (string, error) {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate mac: %w", err)
	}
	return net.HardwareAddr{0x52, 0x54, 0x00, b[0], b[1], b[2]}.String(), nil
}

func hasPrefixAny(s string, prefixes ...string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// checkDiskSpec checks one disk on its own (Define and AttachDisk).
func checkDiskSpec(bad func(string, ...any), what string, dk xen.Disk) {
	switch {
	case dk.NBDSocket != "" && dk.Path != "":
		bad("%s: give either path or nbd_socket, not both", what)
	case dk.NBDSocket != "":
		checkSocket(bad, what+".nbd_socket", dk.NBDSocket)
	case dk.Path == "":
		bad("%s: give a path (file or block device) or an nbd_socket", what)
	default:
		checkDisk(bad, what+".path", dk.Path)
	}
	if dk.NBDSocket == "" && dk.NBDExport != "" {
		bad("%s: nbd_export given without nbd_socket", what)
	}
	if dk.NBDSocket == "" && dk.NBDReconnectDelay != 0 {
		bad("%s: nbd_reconnect_delay given without nbd_socket", what)
	}
	if dk.NBDReconnectDelay > 3600 {
		bad("%s: nbd_reconnect_delay %d: at most 3600 seconds", what, dk.NBDReconnectDelay)
	}
	if dk.Serial != "" && !serialRE.MatchString(dk.Serial) {
		bad("%s: serial %q: 1 to 20 letters, digits, '.', '_' or '-'", what, dk.Serial)
	}
	switch dk.Format {
	case "", "raw", "qcow2":
	default:
		bad("%s: format %q: use raw or qcow2", what, dk.Format)
	}
	if dk.Target != "" && !targetRE.MatchString(dk.Target) {
		bad("%s: target %q: use vda, vdb, ... (virtio names)", what, dk.Target)
	}
}
