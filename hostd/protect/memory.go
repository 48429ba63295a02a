package protect

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"hostd/checkpoint/memserver"
	"hostd/hostd/config"
)

// Memories starts, finds and stops the memory servers of this host's VMs.
// It implements vm.Memory.
type Memories struct {
	cfg config.Config
	exe string // the hostd binary: memory servers are `hostd memserve`
	log *slog.Logger

	mu      sync.Mutex
	clients map[string]*memserver.Client
}

// NewMemories uses exe (normally os.Executable()) to start memory servers.
func NewMemories(cfg config.Config, exe string, log *slog.Logger) *Memories {
	return &Memories{cfg: cfg, exe: exe, log: log, clients: map[string]*memserver.Client{}}
}

// memPaths are the files of one domain's memory server.
type memPaths struct {
	dir, mount, config, log, socket string
}

// paths derives a memory server's files from its domain's name, which
// config checks: a name that could leave the state directory is an error.
func (m *Memories) paths(vm string) (memPaths, error) {
	dir, err := m.cfg.VMDir(vm)
	if err != nil {
		return memPaths{}, err
	}
	sock, err := m.cfg.RunSocket("mem", vm)
	if err != nil {
		return memPaths{}, err
	}
	return memPaths{dir: dir, mount: filepath.Join(dir, "mem"), config: filepath.Join(dir, "memserver.json"),
		log: filepath.Join(dir, "memserver.log"), socket: sock}, nil
}

// Serve starts (or finds) the VM's memory server and returns its RAM path.
func (m *Memories) Serve(ctx context.Context, vm string, size int64) (string, error) {
	return m.serve(ctx, memserver.Config{VM: vm, Size: size})
}

// serve starts a memory server from cfg (paths filled in here) unless a
// live one of the same size already serves the VM.
func (m *Memories) serve(ctx context.Context, cfg memserver.Config) (string, error) {
	op := "serve memory of VM " + cfg.VM
	if c, err := m.Client(ctx, cfg.VM); err == nil {
		st, err := c.Status(ctx)
		if err == nil && st.Size == cfg.Size && cfg.Restore == nil {
			return st.RAMPath, nil
		}
		if err == nil {
			return "", fmt.Errorf("%s: a memory server of %d bytes already serves it; delete the VM first", op, st.Size)
		}
	}
	p, err := m.paths(cfg.VM)
	if err != nil {
		return "", fmt.Errorf("%s: %w", op, err)
	}
	cfg.Dir, cfg.Socket = p.mount, p.socket
	for _, d := range []string{filepath.Dir(p.socket), p.dir} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return "", fmt.Errorf("%s: %w", op, err)
		}
	}
	cfgFile := p.config
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", fmt.Errorf("%s: %w", op, err)
	}
	if err := os.WriteFile(cfgFile, b, 0o600); err != nil {
		return "", fmt.Errorf("%s: %w", op, err)
	}
	c, pid, err := m.start(ctx, cfg, cfgFile, p.log)
	if err != nil {
		return "", fmt.Errorf("%s: %w", op, err)
	}
	st, err := c.Status(ctx)
	if err != nil {
		return "", fmt.Errorf("%s: %w", op, err)
	}
	m.mu.Lock()
	m.clients[cfg.VM] = c
	m.mu.Unlock()
	m.log.Info("memory server started", "vm", cfg.VM, "pid", pid, "ram", st.RAMPath, "size", cfg.Size)
	return st.RAMPath, nil
}

// start runs a memory server. Under systemd it is an instance of
// hostd-memserver@.service, outside hostd's unit and mount namespace (see
// that unit); elsewhere a child in its own session, which outlives hostd
// the same way.
func (m *Memories) start(ctx context.Context, cfg memserver.Config, cfgFile, logFile string) (*memserver.Client, int, error) {
	if os.Getenv("INVOCATION_ID") != "" && cfgFile == filepath.Join("/var/lib/hostd/vms", cfg.VM, "memserver.json") {
		unit := "hostd-memserver@" + cfg.VM + ".service"
		if out, err := exec.CommandContext(ctx, "systemctl", "start", unit).CombinedOutput(); err != nil {
			return nil, 0, fmt.Errorf("systemctl start %s: %w: %s", unit, err, out)
		}
		for delay := 10 * time.Millisecond; ; delay = min(2*delay, time.Second) {
			c, err := memserver.Attach(ctx, cfg.Socket)
			if err == nil {
				return c, 0, nil
			}
			select {
			case <-ctx.Done():
				return nil, 0, fmt.Errorf("wait for %s: %w (journalctl -u %s)", unit, err, unit)
			case <-time.After(delay):
			}
		}
	}
	c, pid, err := memserver.Spawn(ctx, m.exe, []string{"memserve", "-config", cfgFile}, cfg, logFile)
	if err != nil {
		return nil, 0, fmt.Errorf("%w (its log: %s)", err, logFile)
	}
	return c, pid, nil
}

// Client returns the control client of a running memory server, attaching
// to it (after a hostd restart) if need be.
func (m *Memories) Client(ctx context.Context, vm string) (*memserver.Client, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c, ok := m.clients[vm]; ok {
		return c, nil
	}
	p, err := m.paths(vm)
	if err != nil {
		return nil, fmt.Errorf("memory server of VM %s: %w", vm, err)
	}
	c, err := memserver.Attach(ctx, p.socket)
	if err != nil {
		return nil, fmt.Errorf("memory server of VM %s: %w", vm, err)
	}
	m.clients[vm] = c
	return c, nil
}

// Release stops the VM's memory server (QEMU must be gone).
func (m *Memories) Release(ctx context.Context, vm string) error {
	c, err := m.Client(ctx, vm)
	m.mu.Lock()
	delete(m.clients, vm)
	m.mu.Unlock()
	if err != nil {
		return nil // nothing runs
	}
	if err := c.Shutdown(ctx); err != nil {
		return fmt.Errorf("stop memory server of VM %s: %w", vm, err)
	}
	m.log.Info("memory server stopped", "vm", vm)
	return nil
}
