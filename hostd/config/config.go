package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"hostd/hostd/valid"
)

// Role names: one binary, roles switched on by configuration.
const (
	RoleHost   = "host"   // runs nested VMs
	RoleBackup = "backup" // stores memory checkpoints (checkpoint issue)
	RoleRepo   = "repo"   // lends memory for cooperative swap (swap issue)
)

// Config is the whole configuration. Field comments name the TOML keys.
type Config struct {
	Roles    []string `toml:"roles"`
	StateDir string   `toml:"state_dir"`
	RunDir   string   `toml:"run_dir"`

	API        API        `toml:"api"`
	Hypervisor Hypervisor `toml:"hypervisor"`
	Guest      Guest      `toml:"guest"`
	Dataplane  Dataplane  `toml:"dataplane"`
	Checkpoint Checkpoint `toml:"checkpoint"`
	Backup     Backup     `toml:"backup"`
	Restore    Restore    `toml:"restore"`
	Repo       Repo       `toml:"repo"`
	Swap       Swap       `toml:"swap"`
	Notice     Notice     `toml:"notice"`
	Log        Log        `toml:"log"`
}

// TLS names the PEM files of an identity and the CA that vouches for peers
// (`make pki` creates a test set).
type TLS struct {
	CA   string `toml:"ca"`
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
}

// Set reports whether all three files are named.
func (t TLS) Set() bool { return t.CA != "" && t.Cert != "" && t.Key != "" }

// Checkpoint configures the host side of memory protection: how this host
// authenticates to backups and the defaults of a protection request.
type Checkpoint struct {
	TLS TLS `toml:"tls"`
	// DefaultBound is T when a protection request names none.
	DefaultBound Duration `toml:"default_bound"`
	// CommitInterval is how often streamed pages are committed (made
	// durable) between restore points when no epoch interval is set.
	CommitInterval Duration `toml:"commit_interval"`
	// BackupBandwidth (bytes/s) is what all protected VMs of this host may
	// send to backups together; it is shared among them by weight. 0: no
	// host limit (the VMs' connections share the link as TCP does).
	BackupBandwidth float64 `toml:"backup_bandwidth"`
}

// Restore configures the host side of restores.
type Restore struct {
	// WarmSlots are pre-started, paused incoming domains (with empty
	// memory servers) kept ready so that a restore of a VM of the same
	// shape only loads the device state and resumes. Refilled after each
	// claim; removed when hostd stops. Empty: every restore is cold.
	WarmSlots []WarmSlot `toml:"warm_slots"`
}

// WarmSlot is one shape of warm slot and how many of it to keep.
type WarmSlot struct {
	MemoryMiB uint64 `toml:"memory_mib"`
	VCPUs     int    `toml:"vcpus"`
	Count     int    `toml:"count"`
}

func (r Restore) validate() error {
	seen := map[[2]uint64]bool{}
	for i, w := range r.WarmSlots {
		switch {
		case w.MemoryMiB < 16:
			return fmt.Errorf("restore.warm_slots[%d].memory_mib: %d is below the minimum of 16", i, w.MemoryMiB)
		case w.VCPUs < 1:
			return fmt.Errorf("restore.warm_slots[%d].vcpus: must be at least 1", i)
		case w.Count < 0 || w.Count > 16:
			return fmt.Errorf("restore.warm_slots[%d].count: %d is not 0-16", i, w.Count)
		}
		k := [2]uint64{w.MemoryMiB, uint64(w.VCPUs)}
		if seen[k] {
			return fmt.Errorf("restore.warm_slots[%d]: a second entry of %d MiB and %d vCPUs; give one entry a larger count", i, w.MemoryMiB, w.VCPUs)
		}
		seen[k] = true
	}
	return nil
}

// Backup configures the backup role: a TLS listener storing checkpoints.
type Backup struct {
	Listen string `toml:"listen"` // host:port
	Dir    string `toml:"dir"`    // the store; default <state_dir>/backup
	TLS    TLS    `toml:"tls"`
}

// Repo configures the repo role: memory lent to other hosts' cooperative
// swap devices over mutual TLS.
type Repo struct {
	Listen string `toml:"listen"` // host:port
	// CapacityMiB is the memory lent, allocated (and locked) at start.
	CapacityMiB int64 `toml:"capacity_mib"`
	// DefaultQuotaMiB bounds each client host (certificate common name)
	// not named in Quotas; 0: the whole capacity.
	DefaultQuotaMiB int64 `toml:"default_quota_mib"`
	// QuotasMiB per client host, by certificate common name.
	QuotasMiB map[string]int64 `toml:"quotas_mib"`
	// Lock pins the lent memory (mlock) so it is never swapped out; where
	// RLIMIT_MEMLOCK forbids it the repository warns and serves unlocked.
	Lock bool `toml:"lock"`
	// OrphanTimeout is how long a disconnected client's pages are kept
	// for it to come back.
	OrphanTimeout Duration `toml:"orphan_timeout"`
	TLS           TLS      `toml:"tls"`
}

// Swap configures the host side of cooperative swap: the identity towards
// repositories and the overload policy.
type Swap struct {
	// TLS is this host's client identity towards repositories (its
	// certificate's common name is its quota key there). All three files,
	// or none (then only swap devices without repositories work).
	TLS TLS `toml:"tls"`
	// SampleInterval is how often each device's paging rate is sampled
	// for the overload policy.
	SampleInterval Duration `toml:"sample_interval"`
	// RateThreshold (paging operations, 4 KiB pages read or written, per
	// second) above which an interval is overloaded.
	RateThreshold float64 `toml:"rate_threshold"`
	// InitialThreshold is the migration threshold before a VM has a
	// history of transient overloads.
	InitialThreshold Duration `toml:"initial_threshold"`
	// ReconnectDelay is how long QEMU keeps a swap disk's requests
	// waiting for hostd's NBD server to come back (a hostd restart).
	ReconnectDelay Duration `toml:"reconnect_delay"`
	// MaxSizeMiB bounds one device (its local file is that large).
	MaxSizeMiB int64 `toml:"max_size_mib"`
}

// Notice configures the cloud termination-notice watchers; each is off by
// default. A notice evacuates every protected VM.
type Notice struct {
	EC2   Watcher `toml:"ec2"`
	GCE   Watcher `toml:"gce"`
	Azure Watcher `toml:"azure"`
}

// Watcher is one provider's metadata poller.
type Watcher struct {
	Enabled bool   `toml:"enabled"`
	BaseURL string `toml:"base_url"`
	// Interval between polls; 0 is the provider's documented cadence.
	Interval Duration `toml:"interval"`
}

// Dataplane configures VirtualWire connectors (kernel VXLAN + eBPF).
// Connectors are off while Underlay is empty.
type Dataplane struct {
	// Underlay is this host's underlay IP address: the VXLAN source, and
	// how peers name this host in connector endpoints.
	Underlay string `toml:"underlay"`
	// UnderlayDevice carries Underlay; found from the address if empty.
	UnderlayDevice string `toml:"underlay_device"`
	Backend        string `toml:"backend"` // ebpf | netdev
	VXLANDevice    string `toml:"vxlan_device"`
	Port           int    `toml:"port"`
	// PinPath (ebpf only) keeps the connector maps on bpffs, so connectors
	// keep forwarding while hostd restarts. Empty: removed at stop.
	PinPath string `toml:"pin_path"`
}

// API is the local socket the scheduler talks to.
type API struct {
	Socket string `toml:"socket"`
	// Group may use the socket besides root; it owns the socket file.
	Group string `toml:"group"`
	// MetricsListen, if set (host:port), serves GET /metrics read-only
	// over TCP, for a Prometheus that must not reach the socket.
	MetricsListen string `toml:"metrics_listen"`
	// JobRetention is how long finished jobs stay listed (and readable
	// by id) before they are pruned.
	JobRetention Duration `toml:"job_retention"`
}

// Hypervisor selects and tunes the second-layer hypervisor driver.
type Hypervisor struct {
	URI   string `toml:"uri"`
	Accel string `toml:"accel"` // auto | kvm | tcg
	// ShutdownTimeout bounds an ACPI shutdown before it is reported failed.
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// ReconcileInterval is how often hostd re-reads libvirt's view of its VMs.
	ReconcileInterval Duration `toml:"reconcile_interval"`
}

// Guest is the default guest image used when a create request names none.
type Guest struct {
	Kernel  string `toml:"kernel"`
	Initrd  string `toml:"initrd"`
	Cmdline string `toml:"cmdline"`
}

// Log configures slog output.
type Log struct {
	Level  string `toml:"level"`  // debug | info | warn | error
	Format string `toml:"format"` // json | text
}

// Duration is a time.Duration written as "30s" in TOML.
type Duration struct{ time.Duration }

// UnmarshalText lets TOML strings such as "2m" fill a Duration.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("parse duration %q: %w", b, err)
	}
	d.Duration = v
	return nil
}

// MarshalText writes a Duration back as "30s".
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Default returns the configuration hostd runs with when no file is given.
// Keep hostd.toml in step: a test compares the two.
func Default() Config {
	return Config{
		Roles:    []string{RoleHost},
		StateDir: "/var/lib/hostd",
		RunDir:   "/run/hostd",
		API: API{
			Socket:       "/run/hostd/hostd.sock",
			Group:        "hostd",
			JobRetention: Duration{7 * 24 * time.Hour},
		},
		Hypervisor: Hypervisor{
			URI:               "qemu:///system",
			Accel:             "auto",
			ShutdownTimeout:   Duration{60 * time.Second},
			ReconcileInterval: Duration{30 * time.Second},
		},
		Guest: Guest{
			Kernel:  "/usr/lib/hostd/guest/vmlinuz",
			Initrd:  "/usr/lib/hostd/guest/initrd.img",
			Cmdline: "console=ttyS0 panic=-1",
		},
		Dataplane: Dataplane{Backend: "ebpf", VXLANDevice: "vw0", Port: 4789, PinPath: "/sys/fs/bpf/hostd"},
		Checkpoint: Checkpoint{
			DefaultBound:   Duration{30 * time.Second},
			CommitInterval: Duration{2 * time.Second},
		},
		Backup:  Backup{Listen: "0.0.0.0:7443"},
		Repo:    Repo{Listen: "0.0.0.0:7011", CapacityMiB: 1024, QuotasMiB: map[string]int64{}, Lock: true, OrphanTimeout: Duration{2 * time.Minute}},
		Restore: Restore{WarmSlots: []WarmSlot{}},
		Swap: Swap{
			SampleInterval: Duration{10 * time.Second}, RateThreshold: 200,
			InitialThreshold: Duration{120 * time.Second}, ReconnectDelay: Duration{30 * time.Second},
			MaxSizeMiB: 64 << 10,
		},
		Notice: Notice{
			EC2:   Watcher{BaseURL: "http://169.254.169.254"},
			GCE:   Watcher{BaseURL: "http://169.254.169.254"},
			Azure: Watcher{BaseURL: "http://169.254.169.254"},
		},
		Log: Log{Level: "info", Format: "json"},
	}
}

// Load reads path over the defaults. An empty path, or a path that does not
// exist when allowMissing is set, yields the defaults.
func Load(path string, allowMissing bool) (Config, error) {
	cfg := Default()
	if path == "" {
		return cfg, cfg.Validate()
	}
	md, err := toml.DecodeFile(path, &cfg)
	if errors.Is(err, fs.ErrNotExist) && allowMissing {
		return cfg, cfg.Validate()
	}
	if err != nil {
		return Config{}, fmt.Errorf("load config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return Config{}, fmt.Errorf("load config %s: unknown keys %s (see hostd.toml for the valid ones)", path, strings.Join(keys, ", "))
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("load config %s: %w", path, err)
	}
	return cfg, nil
}

// Validate reports the first setting that cannot work.
func (c Config) Validate() error {
	if len(c.Roles) == 0 {
		return errors.New("roles: at least one role is needed (host, backup, repo)")
	}
	for _, r := range c.Roles {
		if !slices.Contains([]string{RoleHost, RoleBackup, RoleRepo}, r) {
			return fmt.Errorf("roles: unknown role %q (want host, backup or repo)", r)
		}
	}
	for name, p := range map[string]string{"state_dir": c.StateDir, "run_dir": c.RunDir, "api.socket": c.API.Socket} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%s: %q must be an absolute path", name, p)
		}
	}
	if c.API.JobRetention.Duration < time.Minute {
		return errors.New("api.job_retention: must be at least 1m")
	}
	if c.API.MetricsListen != "" {
		if err := valid.HostPort("api.metrics_listen", c.API.MetricsListen); err != nil {
			return err
		}
	}
	if len(c.API.Socket) > 107 {
		return fmt.Errorf("api.socket: %q is longer than a unix socket path may be (107 bytes)", c.API.Socket)
	}
	switch c.Hypervisor.Accel {
	case "auto", "kvm", "tcg":
	default:
		return fmt.Errorf("hypervisor.accel: %q is not one of auto, kvm, tcg", c.Hypervisor.Accel)
	}
	if c.Hypervisor.ShutdownTimeout.Duration <= 0 {
		return errors.New("hypervisor.shutdown_timeout: must be positive")
	}
	if c.Hypervisor.ReconcileInterval.Duration < time.Second {
		return errors.New("hypervisor.reconcile_interval: must be at least 1s")
	}
	if err := c.Dataplane.validate(); err != nil {
		return err
	}
	if err := c.Checkpoint.validate(); err != nil {
		return err
	}
	if err := c.Restore.validate(); err != nil {
		return err
	}
	if c.HasRole(RoleBackup) {
		if err := c.Backup.validate(); err != nil {
			return err
		}
	}
	if c.HasRole(RoleRepo) {
		if err := c.Repo.validate(); err != nil {
			return err
		}
	}
	if err := c.Swap.validate(); err != nil {
		return err
	}
	for name, w := range map[string]Watcher{"ec2": c.Notice.EC2, "gce": c.Notice.GCE, "azure": c.Notice.Azure} {
		if w.Enabled && !strings.HasPrefix(w.BaseURL, "http://") && !strings.HasPrefix(w.BaseURL, "https://") {
			return fmt.Errorf("notice.%s.base_url: %q is not an http(s) URL", name, w.BaseURL)
		}
		if w.Interval.Duration < 0 {
			return fmt.Errorf("notice.%s.interval: must not be negative", name)
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log.level: %q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		return fmt.Errorf("log.format: %q is not json or text", c.Log.Format)
	}
	return nil
}

func (d Dataplane) validate() error {
	if d.Underlay != "" {
		if _, err := netip.ParseAddr(d.Underlay); err != nil {
			return fmt.Errorf("dataplane.underlay: %q is not an IP address", d.Underlay)
		}
	}
	switch d.Backend {
	case "ebpf", "netdev":
	default:
		return fmt.Errorf("dataplane.backend: %q is not ebpf or netdev", d.Backend)
	}
	if d.Port < 1 || d.Port > 65535 {
		return fmt.Errorf("dataplane.port: %d is not a UDP port", d.Port)
	}
	if len(d.VXLANDevice) == 0 || len(d.VXLANDevice) > 15 {
		return fmt.Errorf("dataplane.vxlan_device: %q must be 1-15 characters", d.VXLANDevice)
	}
	return nil
}

func (c Checkpoint) validate() error {
	if c.DefaultBound.Duration <= 0 {
		return errors.New("checkpoint.default_bound: must be positive")
	}
	if c.CommitInterval.Duration < 0 {
		return errors.New("checkpoint.commit_interval: must not be negative")
	}
	if c.BackupBandwidth < 0 {
		return errors.New("checkpoint.backup_bandwidth: must not be negative")
	}
	return c.TLS.validate("checkpoint.tls", false)
}

func (b Backup) validate() error {
	if _, _, err := net.SplitHostPort(b.Listen); err != nil {
		return fmt.Errorf("backup.listen: %q is not host:port: %w", b.Listen, err)
	}
	if b.Dir != "" && !filepath.IsAbs(b.Dir) {
		return fmt.Errorf("backup.dir: %q must be an absolute path", b.Dir)
	}
	return b.TLS.validate("backup.tls", true)
}

func (r Repo) validate() error {
	if _, _, err := net.SplitHostPort(r.Listen); err != nil {
		return fmt.Errorf("repo.listen: %q is not host:port: %w", r.Listen, err)
	}
	if r.CapacityMiB < 1 || r.CapacityMiB > 1<<30 {
		return fmt.Errorf("repo.capacity_mib: %d must be at least 1", r.CapacityMiB)
	}
	if r.DefaultQuotaMiB < 0 {
		return errors.New("repo.default_quota_mib: must not be negative")
	}
	for name, q := range r.QuotasMiB {
		if q < 0 {
			return fmt.Errorf("repo.quotas_mib.%s: must not be negative", name)
		}
	}
	if r.OrphanTimeout.Duration < time.Second {
		return errors.New("repo.orphan_timeout: must be at least 1s")
	}
	return r.TLS.validate("repo.tls", true)
}

func (s Swap) validate() error {
	if s.SampleInterval.Duration < 100*time.Millisecond {
		return errors.New("swap.sample_interval: must be at least 100ms")
	}
	if s.RateThreshold <= 0 {
		return errors.New("swap.rate_threshold: must be positive")
	}
	if s.InitialThreshold.Duration < s.SampleInterval.Duration {
		return errors.New("swap.initial_threshold: must be at least one sample_interval")
	}
	if s.ReconnectDelay.Duration < 0 || s.ReconnectDelay.Duration > time.Hour {
		return errors.New("swap.reconnect_delay: must be 0s..1h")
	}
	if s.MaxSizeMiB < 1 {
		return errors.New("swap.max_size_mib: must be at least 1")
	}
	return s.TLS.validate("swap.tls", false)
}

// validate checks that the files are all named or (unless required) none.
func (t TLS) validate(section string, required bool) error {
	if !t.Set() && (required || t.CA != "" || t.Cert != "" || t.Key != "") {
		return fmt.Errorf("%s: ca, cert and key must all be set (make pki creates a test set)", section)
	}
	return nil
}

// BackupDir is where the backup role keeps its store.
func (c Config) BackupDir() string {
	if c.Backup.Dir != "" {
		return c.Backup.Dir
	}
	return filepath.Join(c.StateDir, "backup")
}

// HasRole reports whether role r is switched on.
func (c Config) HasRole(r string) bool { return slices.Contains(c.Roles, r) }

// VMDir is where hostd keeps one domain's files (RAM file, serial log,
// memory server's files). domain must be a VM's or a warm slot's name
// (valid.DomainName): any other name is an error, never a path, so that no
// request can make hostd touch a file outside its state directory.
func (c Config) VMDir(domain string) (string, error) {
	if err := valid.DomainName(domain); err != nil {
		return "", err
	}
	return valid.Within(filepath.Join(c.StateDir, "vms"), domain)
}

// RunSocket is the unix socket of kind sub ("agents", "mem", "swap") named
// after a domain in the run directory, checked as VMDir checks.
func (c Config) RunSocket(sub, domain string) (string, error) {
	if err := valid.DomainName(domain); err != nil {
		return "", err
	}
	return valid.Within(filepath.Join(c.RunDir, sub), domain+".sock")
}

// EnsureDirs creates the state and run directories with private modes.
func (c Config) EnsureDirs() error {
	for _, d := range []string{c.StateDir, filepath.Join(c.StateDir, "vms"), c.RunDir, filepath.Dir(c.API.Socket)} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return fmt.Errorf("create directory %s: %w", d, err)
		}
	}
	return nil
}
