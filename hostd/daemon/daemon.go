package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"hostd/checkpoint/pki"
	"hostd/dataplane"
	"hostd/hostd/api"
	"hostd/hostd/config"
	"hostd/hostd/connector"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/hostd/scrape"
	"hostd/hostd/store"
	"hostd/hostd/swap"
	"hostd/hostd/vm"
	"hostd/xen"
)

// Options are what Run needs besides the configuration.
type Options struct {
	Config  config.Config
	Log     *slog.Logger
	Version string
	// NewHypervisor connects the second-layer hypervisor driver; Run retries
	// it until it succeeds or ctx ends, so hostd can start before libvirtd.
	NewHypervisor func(ctx context.Context) (xen.Hypervisor, error)
	// Reload, if set, delivers reload requests (SIGHUP): the backup's and
	// the repository's TLS identities are read again from their files,
	// and Reconfigure is called.
	Reload <-chan os.Signal
	// Reconfigure applies the configuration keys that can change while
	// hostd runs (the log level); nil: none.
	Reconfigure func() error
}

// Run serves until ctx ends, then stops gracefully.
func Run(ctx context.Context, o Options) error {
	cfg, log := o.Config, o.Log
	if err := cfg.EnsureDirs(); err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	st, err := store.Open(cfg.StateDir, 5*time.Second)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	defer st.Close()

	// Background work lives as long as the daemon, not as long as a request.
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()

	ev := events.NewBroker()
	jm, err := jobs.NewManager(st, ev, log)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	go jm.PruneEvery(bg, time.Hour, cfg.API.JobRetention.Duration)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := prometheus.NewGauge(prometheus.GaugeOpts{Name: "hostd_build_info", Help: "hostd version.", ConstLabels: prometheus.Labels{"version": o.Version}})
	build.Set(1)
	reg.MustRegister(build)
	deps := api.Deps{Jobs: jm, Events: ev, Version: o.Version, Roles: cfg.Roles, Registry: reg, Gatherer: reg, Log: log}

	// What a reload reads again: the servers' TLS identities.
	ids := map[string]*pki.ServerIdentity{}
	if cfg.HasRole(config.RoleBackup) {
		stop, addr, id, err := startBackup(bg, cfg, log)
		if err != nil {
			return fmt.Errorf("run hostd: %w", err)
		}
		defer stop()
		ids["backup"] = id
		deps.Backup = &api.BackupInfo{Listen: addr, Dir: cfg.BackupDir()}
	}

	if cfg.HasRole(config.RoleRepo) {
		srv, addr, stop, id, err := startRepo(bg, cfg, log)
		if err != nil {
			return fmt.Errorf("run hostd: %w", err)
		}
		defer stop()
		ids["repo"] = id
		deps.Repo = &api.RepoInfo{Listen: addr, Server: srv}
	}
	if o.Reload != nil {
		go reloads(bg, o, ids)
	}

	var host *hostRole
	if cfg.HasRole(config.RoleHost) {
		host, err = startHost(ctx, bg, o, st, ev, jm, reg, &deps)
		if err != nil {
			return fmt.Errorf("run hostd: %w", err)
		}
		defer host.close()
	}

	srv, err := api.New(deps, cfg.API.Group)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	l, err := srv.Listen(cfg.API.Socket)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	// The read-only metrics listener binds before anything starts, so a
	// taken address fails the start cleanly.
	var ms *scrape.Server
	if cfg.API.MetricsListen != "" {
		if ms, err = scrape.Listen(cfg.API.MetricsListen, reg, log); err != nil {
			l.Close()
			return fmt.Errorf("run hostd: %w", err)
		}
	}
	if host != nil {
		host.run(bg)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(bg, l) }()
	if ms != nil {
		go func() {
			if err := ms.Serve(bg); err != nil {
				log.Error("metrics listener stopped", "err", err)
			}
		}()
		log.Info("metrics listener", "addr", ms.Addr())
	}

	_, _ = sdnotify.SdNotify(false, sdnotify.SdNotifyReady)
	log.Info("hostd ready", "socket", cfg.API.Socket, "version", o.Version, "roles", cfg.Roles)
	stopWatchdog := watchdog(bg, log)
	defer stopWatchdog()

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	}

	// Graceful stop: stop taking requests, let jobs finish for a while, and
	// leave every guest (and its memory server) running.
	_, _ = sdnotify.SdNotify(false, sdnotify.SdNotifyStopping)
	log.Info("hostd stopping; guests keep running")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	stopBG() // ends event streams, watchers and running jobs' waits
	if serr := srv.Shutdown(sctx); serr != nil {
		log.Warn("API shutdown", "err", serr)
	}
	if werr := jm.Wait(sctx); werr != nil {
		log.Warn("jobs still running at stop; they will show as interrupted", "err", werr)
	}
	if host != nil {
		host.wait()
	}
	return err
}

// hostRole is the host role's parts: the hypervisor, VMs, connectors and
// the memory plane.
type hostRole struct {
	cfg   config.Config
	log   *slog.Logger
	hv    xen.Hypervisor
	vms   *vm.Manager
	prot  *protect.Manager
	swap  *swap.Manager
	dp    dataplane.Dataplane
	loops sync.WaitGroup
}

func startHost(ctx, bg context.Context, o Options, st *store.Store, ev *events.Broker, jm *jobs.Manager, reg *prometheus.Registry, deps *api.Deps) (*hostRole, error) {
	cfg, log := o.Config, o.Log
	hv, err := connect(ctx, o)
	if err != nil {
		return nil, err
	}
	h := &hostRole{cfg: cfg, log: log, hv: hv}
	h.vms = vm.NewManager(bg, cfg, hv, st, ev, jm, log)
	reg.MustRegister(vm.NewCollector(h.vms))

	exe, err := os.Executable()
	if err != nil {
		hv.Close()
		return nil, fmt.Errorf("find own executable (memory servers run it): %w", err)
	}
	h.prot = protect.NewManager(bg, cfg, hv, h.vms, protect.NewMemories(cfg, exe, log), st, ev, jm, log)
	h.vms.SetMemory(h.prot)
	reg.MustRegister(protect.NewCollector(h.prot))

	dp, self, err := openDataplane(ctx, cfg.Dataplane, log)
	if err != nil {
		hv.Close()
		return nil, err
	}
	if dp != nil {
		h.dp = dp
		h.vms.SetNICMTU(dp.MTU())
		reg.MustRegister(dataplane.NewCollector(dp))
		deps.Dataplane = &api.DataplaneInfo{Backend: string(dp.Backend()), Underlay: self.String(), MTU: dp.MTU()}
	}
	conns := connector.NewManager(dp, self, h.vms, st, ev, log)
	if err := conns.Restore(ctx); err != nil {
		log.Error("some connectors could not be restored; GET /v1/connectors lists what the store holds", "err", err)
	}
	h.swap = swap.NewManager(bg, cfg, hv, h.vms, st, ev, log)
	reg.MustRegister(swap.NewCollector(h.swap))
	deps.VMs, deps.Hypervisor, deps.Connectors, deps.Protection, deps.Swap = h.vms, hv, conns, h.prot, h.swap
	return h, nil
}

// run starts the host role's background loops: reconciliation, warm
// slots, swap devices (served again for VMs that outlived the last hostd)
// and their overload sampler, protection (re-attached to the memory
// servers that outlived the last hostd), bandwidth shares and
// termination-notice watchers.
func (h *hostRole) run(bg context.Context) {
	h.loops.Add(5)
	go func() {
		defer h.loops.Done()
		h.vms.Run(bg, h.cfg.Hypervisor.ReconcileInterval.Duration)
	}()
	go func() {
		defer h.loops.Done()
		h.prot.StartSlots(bg)
	}()
	// Swap devices of VMs that still run are served again before their
	// QEMU's reconnect delay runs out.
	h.swap.Resume(bg)
	go func() {
		defer h.loops.Done()
		h.swap.Watch(bg)
	}()
	h.prot.Resume(bg)
	go func() {
		defer h.loops.Done()
		h.prot.Run(bg)
	}()
	go func() {
		defer h.loops.Done()
		watchNotices(bg, h.cfg.Notice, h.prot, h.log)
	}()
}

func (h *hostRole) wait() {
	h.loops.Wait()
	h.swap.Close()
	h.vms.Wait()
	h.prot.Wait()
	// Warm slots hold no guest: unlike VMs they end with hostd.
	h.prot.StopSlots()
}

// close releases the hypervisor connection and the dataplane. With pinned
// maps, closing the dataplane leaves connectors forwarding for the next
// daemon; without, it removes them (Restore re-creates them).
func (h *hostRole) close() {
	if h.dp != nil {
		h.dp.Close()
	}
	h.hv.Close()
}

// connect retries the hypervisor driver until it answers: hostd is not
// ready (no socket, no READY=1) before it can reach its hypervisor.
func connect(ctx context.Context, o Options) (xen.Hypervisor, error) {
	delay := 500 * time.Millisecond
	for attempt := 1; ; attempt++ {
		hv, err := o.NewHypervisor(ctx)
		if err == nil {
			return hv, nil
		}
		o.Log.Warn("hypervisor not reachable; retrying", "attempt", attempt, "err", err, "retry_in", delay)
		_, _ = sdnotify.SdNotify(false, "STATUS=waiting for the hypervisor: "+err.Error())
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to hypervisor: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(delay*2, 10*time.Second)
	}
}

// watchdog pets systemd's watchdog at half its interval while the daemon's
// main loop is alive. It returns a function that stops it.
func watchdog(ctx context.Context, log *slog.Logger) func() {
	interval, err := sdnotify.SdWatchdogEnabled(false)
	if err != nil || interval == 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				_, _ = sdnotify.SdNotify(false, sdnotify.SdNotifyWatchdog)
			}
		}
	}()
	log.Info("systemd watchdog on", "interval", interval)
	return cancel
}

// reloads answers each reload request (SIGHUP) until ctx ends: the
// configuration keys that can change, then every server identity; what
// fails to load is logged and the old one stays in use.
func reloads(ctx context.Context, o Options, ids map[string]*pki.ServerIdentity) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-o.Reload:
		}
		ok := true
		if o.Reconfigure != nil {
			if err := o.Reconfigure(); err != nil {
				ok = false
				o.Log.Error("reload the configuration", "err", err)
			}
		}
		for role, id := range ids {
			if err := id.Reload(); err != nil {
				ok = false
				o.Log.Error("reload TLS identity", "role", role, "err", err)
			}
		}
		o.Log.Info("reloaded", "ok", ok, "identities", len(ids))
	}
}
