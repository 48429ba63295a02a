package libvirt

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"hostd/xen"
)

// Config configures a Driver. Zero values take the defaults in the comments.
type Config struct {
	// URI of libvirtd; "qemu:///system".
	URI string
	// Accel: auto (default), kvm or tcg. Auto boots ProbeKernel under KVM
	// once, in New, and settles on TCG unless it really boots.
	Accel xen.Accel
	// Logger; slog.Default().
	Logger *slog.Logger

	// ProbeKernel and ProbeInitrd boot the KVM probe guest (auto only). With
	// no kernel the probe is skipped and the driver uses TCG.
	ProbeKernel string
	ProbeInitrd string
	// ProbeTimeout bounds the probe boot; 15s.
	ProbeTimeout time.Duration
	// ProbeDir holds the probe's serial log; os.TempDir(). libvirtd must see
	// the same file system (the probe only works on a local libvirtd).
	ProbeDir string

	// KeepAliveInterval and KeepAliveCount: a daemon that stops answering
	// is declared lost after about interval*(count+1); 5s and 3.
	KeepAliveInterval time.Duration
	KeepAliveCount    uint
	// ReconnectInterval paces reconnection attempts while libvirtd is away
	// and an event subscriber waits; 1s.
	ReconnectInterval time.Duration

	// BalloonStatsPeriod is how often the guest's balloon driver reports
	// memory statistics; 5s. Whole seconds.
	BalloonStatsPeriod time.Duration
}

func (c *Config) setDefaults() {
	if c.URI == "" {
		c.URI = "qemu:///system"
	}
	if c.Accel == "" {
		c.Accel = xen.AccelAuto
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.ProbeTimeout <= 0 {
		c.ProbeTimeout = 15 * time.Second
	}
	if c.KeepAliveInterval < time.Second {
		c.KeepAliveInterval = 5 * time.Second
	}
	if c.KeepAliveCount == 0 {
		c.KeepAliveCount = 3
	}
	if c.ReconnectInterval <= 0 {
		c.ReconnectInterval = time.Second
	}
	if c.BalloonStatsPeriod < time.Second {
		c.BalloonStatsPeriod = 5 * time.Second
	}
}

// Driver is a xen.Hypervisor on libvirt. Safe for concurrent use.
type Driver struct {
	cfg   Config
	log   *slog.Logger
	accel xen.Accel // resolved: kvm or tcg
	lim   limits    // host limits for spec validation, read in New

	mu         sync.Mutex // guards sess, generation, closed
	sess       *session
	generation int
	closed     bool

	lostc chan struct{} // wakes reconnectLoop
	done  chan struct{} // closed by Close
	wg    sync.WaitGroup

	subMu sync.Mutex
	subs  map[chan xen.LifecycleEvent]struct{}
}

var (
	_ xen.Hypervisor = (*Driver)(nil)
	_ xen.Monitor    = (*Driver)(nil)
)

// New connects to libvirtd and resolves the accelerator. It fails with
// xen.ErrUnavailable if libvirtd cannot be reached now.
func New(ctx context.Context, cfg Config) (*Driver, error) {
	cfg.setDefaults()
	switch cfg.Accel {
	case xen.AccelAuto, xen.AccelKVM, xen.AccelTCG:
	default:
		return nil, fmt.Errorf("new libvirt driver: unknown accel %q: use auto, kvm or tcg", cfg.Accel)
	}
	if err := startEventLoop(); err != nil {
		return nil, fmt.Errorf("new libvirt driver: %w", err)
	}
	d := &Driver{
		cfg:   cfg,
		log:   cfg.Logger.With("component", "xen/libvirt"),
		lostc: make(chan struct{}, 1),
		done:  make(chan struct{}),
		subs:  make(map[chan xen.LifecycleEvent]struct{}),
	}
	err := d.call(ctx, "read host limits", func(conn *golibvirt.Connect) error {
		info, err := conn.GetNodeInfo()
		if err != nil {
			return err
		}
		mem, err := hostMemoryKiB(conn, info)
		if err != nil {
			return err
		}
		d.lim = limits{CPUs: int(info.Cpus), MemoryMiB: mem / 1024}
		return nil
	})
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("new libvirt driver: %w", err)
	}
	d.accel, err = d.resolveAccel(ctx)
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("new libvirt driver: %w", err)
	}
	d.log.Info("libvirt driver ready", "uri", cfg.URI, "accel", d.accel,
		"host_cpus", d.lim.CPUs, "host_memory_mib", d.lim.MemoryMiB)
	d.wg.Add(1)
	go d.reconnectLoop()
	return d, nil
}

// Accel is the accelerator the driver resolved to (kvm or tcg).
func (d *Driver) Accel() xen.Accel { return d.accel }

// Monitor returns the driver itself: it speaks QMP through libvirt.
func (d *Driver) Monitor() xen.Monitor { return d }

// Close ends event subscriptions and the connection. Domains keep running.
func (d *Driver) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	s := d.sess
	d.sess = nil
	d.mu.Unlock()

	close(d.done)
	d.wg.Wait()
	if s != nil {
		d.retire(s)
	}
	d.subMu.Lock()
	for ch := range d.subs {
		delete(d.subs, ch)
		close(ch)
	}
	d.subMu.Unlock()
	return nil
}

// Host describes libvirtd and the machine.
func (d *Driver) Host(ctx context.Context) (xen.HostInfo, error) {
	hi := xen.HostInfo{URI: d.cfg.URI, Accel: d.accel}
	err := d.call(ctx, "read host info", func(conn *golibvirt.Connect) error {
		typ, err := conn.GetType()
		if err != nil {
			return err
		}
		hv, err := conn.GetVersion()
		if err != nil {
			return err
		}
		lib, err := conn.GetLibVersion()
		if err != nil {
			return err
		}
		info, err := conn.GetNodeInfo()
		if err != nil {
			return err
		}
		free, err := conn.GetFreeMemory()
		if err != nil {
			return err
		}
		mem, err := hostMemoryKiB(conn, info)
		if err != nil {
			return err
		}
		capsXML, err := conn.GetCapabilities()
		if err != nil {
			return err
		}
		var caps libvirtxml.Caps
		if err := caps.Unmarshal(capsXML); err != nil {
			return fmt.Errorf("parse capabilities: %w", err)
		}
		hi.Driver = typ
		hi.Hypervisor = typ + " " + versionString(hv)
		hi.Library = "libvirt " + versionString(lib)
		hi.CPUModel = info.Model
		if cpu := caps.Host.CPU; cpu != nil {
			if cpu.Model != "" {
				hi.CPUModel = cpu.Model
			}
			for _, f := range cpu.FeatureFlags {
				hi.CPUFlags = append(hi.CPUFlags, f.Name)
			}
		}
		sort.Strings(hi.CPUFlags)
		hi.CPUs = int(info.Cpus)
		hi.MemoryMiB = mem / 1024
		hi.FreeMemoryMiB = free / (1 << 20)
		return nil
	})
	return hi, err
}

// hostMemoryKiB is the host's memory as the kernel counts it (MemTotal).
// NodeGetInfo sums the NUMA nodes instead, which on some cloud VMs leaves out
// memory that is not in any node (seen here: 5.5 of 24 GiB).
func hostMemoryKiB(conn *golibvirt.Connect, info *golibvirt.NodeInfo) (uint64, error) {
	st, err := conn.GetMemoryStats(golibvirt.NODE_MEMORY_STATS_ALL_CELLS, 0)
	if err != nil {
		return 0, err
	}
	if st.TotalSet && st.Total > info.Memory {
		return st.Total, nil
	}
	return info.Memory, nil
}

// versionString formats libvirt's major*1e6+minor*1e3+micro.
func versionString(v uint32) string {
	return fmt.Sprintf("%d.%d.%d", v/1000000, v/1000%1000, v%1000)
}

// domainType is the libvirt domain type for the resolved accelerator.
func (d *Driver) domainType() string {
	if d.accel == xen.AccelKVM {
		return "kvm"
	}
	return "qemu"
}
