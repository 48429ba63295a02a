package guestimage

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"hostd/images/guest/agentapi"
)

// ErrPackagesUnavailable means the Debian packages the guest is built from
// could not be resolved or downloaded (build.sh exit status 3).
var ErrPackagesUnavailable = errors.New("guest packages unavailable")

// Manifest is build/guest/guest.json.
type Manifest struct {
	KernelRelease        string   `json:"kernel_release"`
	KernelPackage        string   `json:"kernel_package"`
	KernelPackageVersion string   `json:"kernel_package_version"`
	BusyboxVersion       string   `json:"busybox_version"`
	GoVersion            string   `json:"go_version"`
	AgentSourceSHA256    string   `json:"agent_source_sha256"`
	Modules              []string `json:"modules"`
	SourceDateEpoch      int64    `json:"source_date_epoch"`
	VmlinuzBytes         int64    `json:"vmlinuz_bytes"`
	VmlinuzSHA256        string   `json:"vmlinuz_sha256"`
	InitrdBytes          int64    `json:"initrd_bytes"`
	InitrdSHA256         string   `json:"initrd_sha256"`
	AgentBytes           int64    `json:"agent_bytes"`
	AgentSHA256          string   `json:"agent_sha256"`
}

// Image is a built guest.
type Image struct {
	Dir      string
	Kernel   string // Dir/vmlinuz
	Initrd   string // Dir/initrd.img
	Manifest Manifest
}

// Load reads a built guest from dir.
func Load(dir string) (Image, error) {
	img := Image{Dir: dir, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	b, err := os.ReadFile(filepath.Join(dir, "guest.json"))
	if err != nil {
		return img, fmt.Errorf("load guest image: %w", err)
	}
	if err := json.Unmarshal(b, &img.Manifest); err != nil {
		return img, fmt.Errorf("load guest image: guest.json: %w", err)
	}
	for _, f := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return img, fmt.Errorf("load guest image: %w", err)
		}
	}
	return img, nil
}

// Build runs images/guest/build.sh into outDir (cheap when nothing
// changed) and loads the result. Its output goes to log line by line.
func Build(ctx context.Context, log *slog.Logger, repoRoot, outDir string) (Image, error) {
	script := filepath.Join(repoRoot, "images", "guest", "build.sh")
	cmd := exec.CommandContext(ctx, "bash", script, outDir)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	done := make(chan []string)
	go func() {
		// Keep the tail for the error message; everything goes to the log.
		var tail []string
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			log.Info("build guest", "line", sc.Text())
			tail = append(tail, sc.Text())
			if len(tail) > 20 {
				tail = tail[1:]
			}
		}
		done <- tail
	}()
	err := cmd.Run()
	pw.Close()
	tail := <-done
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 3 {
			return Image{}, fmt.Errorf("build guest image: %s: %w", strings.Join(tail, "; "), ErrPackagesUnavailable)
		}
		return Image{}, fmt.Errorf("build guest image (%s): %w: %s", script, err, strings.Join(tail, "; "))
	}
	return Load(outDir)
}

// RepoRoot walks up from dir to the directory whose go.mod declares
// module hostd.
func RepoRoot(dir string) (string, error) {
	for d := dir; ; {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && modulePath(b) == "hostd" {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("find hostd repository root above %s: no go.mod of module hostd", dir)
		}
		d = parent
	}
}

func modulePath(gomod []byte) string {
	for _, l := range strings.Split(string(gomod), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "module" {
			return f[1]
		}
	}
	return ""
}

// BootConfig describes one test VM for QEMUArgs.
type BootConfig struct {
	MemMiB      int    // guest RAM; 256 if 0
	AgentSocket string // unix socket QEMU listens on for the agent port; none if ""
	SerialLog   string // file receiving ttyS0; required
	// Cmdline is appended to the kernel command line after
	// "console=ttyS0 quiet panic=-1", e.g. "hostd.ip=10.0.2.15/24".
	Cmdline string
	// Extra arguments appended verbatim (NICs, disks, memory backends).
	Extra []string
}

// QEMUArgs returns qemu-system-x86_64 arguments that boot the image under
// TCG, with no display, no reboot (a guest panic ends QEMU), the serial
// console in BootConfig.SerialLog and the agent channel on
// BootConfig.AgentSocket.
func (img Image) QEMUArgs(c BootConfig) ([]string, error) {
	if c.SerialLog == "" {
		return nil, fmt.Errorf("qemu args: serial log path is required")
	}
	if strings.ContainsAny(c.SerialLog+c.AgentSocket, ",") {
		return nil, fmt.Errorf("qemu args: paths must not contain ',' (QEMU option separator): %q %q", c.SerialLog, c.AgentSocket)
	}
	mem := c.MemMiB
	if mem == 0 {
		mem = 256
	}
	if mem < 64 {
		return nil, fmt.Errorf("qemu args: %d MiB of guest RAM is too little for the guest (64 minimum)", mem)
	}
	args := []string{
		"-accel", "tcg", "-m", strconv.Itoa(mem),
		"-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
		"-kernel", img.Kernel, "-initrd", img.Initrd,
		"-append", strings.TrimSpace("console=ttyS0 quiet panic=-1 " + c.Cmdline),
		"-serial", "file:" + c.SerialLog,
	}
	if c.AgentSocket != "" {
		args = append(args,
			"-device", "virtio-serial",
			"-chardev", "socket,id=agent,server=on,wait=off,path="+c.AgentSocket,
			"-device", "virtserialport,chardev=agent,name="+agentapi.PortName)
	}
	return append(args, c.Extra...), nil
}
