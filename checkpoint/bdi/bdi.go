package bdi

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Dev is one backing device, named major:minor.
type Dev struct {
	Name string // e.g. "0:39"
}

// Of returns the backing device of the filesystem holding path.
func Of(path string) (Dev, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return Dev{}, fmt.Errorf("backing device of %s: %w", path, err)
	}
	major := (st.Dev>>8)&0xfff | (st.Dev>>32)&^0xfff
	minor := st.Dev&0xff | (st.Dev>>12)&^0xff
	return Dev{Name: fmt.Sprintf("%d:%d", major, minor)}, nil
}

// Dir is the device's sysfs directory.
func (d Dev) Dir() string { return filepath.Join("/sys/class/bdi", d.Name) }

func (d Dev) write(attr, v string) error {
	if err := os.WriteFile(filepath.Join(d.Dir(), attr), []byte(v), 0); err != nil {
		return fmt.Errorf("set bdi %s %s=%s: %w", d.Name, attr, v, err)
	}
	return nil
}

func (d Dev) read(attr string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(d.Dir(), attr))
	if err != nil {
		return 0, fmt.Errorf("read bdi %s %s: %w", d.Name, attr, err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("read bdi %s %s: %w", d.Name, attr, err)
	}
	return n, nil
}

// SetStrictLimit makes the device's own limit apply even while the system
// as a whole is below its dirty thresholds. Without it a small per-VM cap
// means nothing on a machine with plenty of memory.
func (d Dev) SetStrictLimit(on bool) error {
	v := "0"
	if on {
		v = "1"
	}
	return d.write("strict_limit", v)
}

// SetMaxBytes bounds the device's dirty + writeback pages. The kernel keeps
// it as a share of the global dirty limit; MaxBytes reads what it made of it.
func (d Dev) SetMaxBytes(n int64) error { return d.write("max_bytes", strconv.FormatInt(n, 10)) }

// MaxBytes reads the effective limit.
func (d Dev) MaxBytes() (int64, error) { return d.read("max_bytes") }

// Unflushed reads dirty + under-writeback bytes from debugfs
// (/sys/kernel/debug/bdi/<dev>/stats); ok is false if debugfs is not
// mounted. An observation only: the kernel enforces the limit whether or
// not anyone looks.
func (d Dev) Unflushed() (int64, bool) {
	return parseStats(filepath.Join("/sys/kernel/debug/bdi", d.Name, "stats"))
}

func parseStats(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	var total int64
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "BdiWriteback" && k != "BdiReclaimable") {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, false
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, false
		}
		total += n << 10
		found++
	}
	return total, found == 2
}

// MountDebugfs mounts debugfs at /sys/kernel/debug if it is not there, so
// that Unflushed can observe. Tests and benchmarks call it; the daemon
// needs no debugfs.
func MountDebugfs() error {
	if _, err := os.Stat("/sys/kernel/debug/bdi"); err == nil {
		return nil
	}
	if err := syscall.Mount("debugfs", "/sys/kernel/debug", "debugfs", 0, ""); err != nil {
		return fmt.Errorf("mount debugfs: %w", err)
	}
	return nil
}
