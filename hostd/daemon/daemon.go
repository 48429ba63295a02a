package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"hostd/dataplane"
	"hostd/hostd/api"
	"hostd/hostd/config"
	"hostd/hostd/connector"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/store"
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
}

// Run serves until ctx ends, then stops gracefully.
func Run(ctx context.Context, o Options) error {
	cfg, log := o.Config, o.Log
	if !cfg.HasRole(config.RoleHost) {
		return errors.New("run hostd: only the host role exists so far; set roles = [\"host\"]")
	}
	if err := cfg.EnsureDirs(); err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	st, err := store.Open(cfg.StateDir, 5*time.Second)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	defer st.Close()

	hv, err := connect(ctx, o)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	defer hv.Close()

	// Background work lives as long as the daemon, not as long as a request.
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()

	ev := events.NewBroker()
	jm, err := jobs.NewManager(st, ev, log)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	vms := vm.NewManager(bg, cfg, hv, st, ev, jm, log)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), vm.NewCollector(vms))

	dp, self, err := openDataplane(ctx, cfg.Dataplane, log)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	var dpInfo *api.DataplaneInfo
	if dp != nil {
		// With pinned maps, Close leaves connectors forwarding for the next
		// daemon; without, it removes them (Restore re-creates them).
		defer dp.Close()
		vms.SetNICMTU(dp.MTU())
		reg.MustRegister(dataplane.NewCollector(dp))
		dpInfo = &api.DataplaneInfo{Backend: string(dp.Backend()), Underlay: self.String(), MTU: dp.MTU()}
	}
	conns := connector.NewManager(dp, self, vms, st, ev, log)
	if err := conns.Restore(ctx); err != nil {
		log.Error("some connectors could not be restored; GET /v1/connectors lists what the store holds", "err", err)
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{Name: "hostd_build_info", Help: "hostd version.", ConstLabels: prometheus.Labels{"version": o.Version}})
	build.Set(1)
	reg.MustRegister(build)

	srv, err := api.New(api.Deps{
		VMs: vms, Jobs: jm, Events: ev, Hypervisor: hv, Connectors: conns, Dataplane: dpInfo,
		Version: o.Version, Roles: cfg.Roles,
		Registry: reg, Gatherer: reg, Log: log,
	}, cfg.API.Group)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}
	l, err := srv.Listen(cfg.API.Socket)
	if err != nil {
		return fmt.Errorf("run hostd: %w", err)
	}

	runDone := make(chan struct{})
	go func() {
		defer close(runDone)
		vms.Run(bg, cfg.Hypervisor.ReconcileInterval.Duration)
	}()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(bg, l) }()

	_, _ = sdnotify.SdNotify(false, sdnotify.SdNotifyReady)
	log.Info("hostd ready", "socket", cfg.API.Socket, "version", o.Version, "roles", cfg.Roles)
	stopWatchdog := watchdog(bg, log)
	defer stopWatchdog()

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	}

	// Graceful stop: stop taking requests, let jobs finish for a while, and
	// leave every guest running.
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
	<-runDone
	vms.Wait()
	return err
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
