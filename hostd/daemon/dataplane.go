package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"hostd/dataplane"
	"hostd/hostd/config"
)

// openDataplane opens the connector dataplane, or returns nil when no
// underlay is configured.
func openDataplane(ctx context.Context, c config.Dataplane, log *slog.Logger) (dataplane.Dataplane, netip.Addr, error) {
	if c.Underlay == "" {
		return nil, netip.Addr{}, nil
	}
	self, err := netip.ParseAddr(c.Underlay)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("open dataplane: %w", err)
	}
	pin := ""
	if c.Backend == string(dataplane.BackendEBPF) && c.PinPath != "" {
		if err := ensureBPFFS(filepath.Dir(c.PinPath), log); err != nil {
			return nil, netip.Addr{}, fmt.Errorf("open dataplane: %w", err)
		}
		pin = c.PinPath
	}
	dp, err := dataplane.New(ctx, dataplane.Config{
		Backend: dataplane.Backend(c.Backend), Underlay: self, UnderlayDevice: c.UnderlayDevice,
		VXLANDevice: c.VXLANDevice, Port: uint16(c.Port), PinPath: pin, Logger: log,
	})
	if err != nil {
		return nil, netip.Addr{}, err
	}
	return dp, self, nil
}

// ensureBPFFS mounts a bpffs at dir unless one is there. systemd does this
// at boot on most distributions; containers and minimal hosts may not.
func ensureBPFFS(dir string, log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w (mount one there, or set dataplane.pin_path = \"\")", dir, err)
	}
	log.Info("mounted bpffs for pinned connector maps", "dir", dir)
	return nil
}
