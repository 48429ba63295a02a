// Command hostd is the host agent of a blanket hypervisor: it owns the nested
// VMs of this host and serves the scheduler on a unix socket.
//
//	hostd [-config /etc/hostd/hostd.toml]
//	hostd memserve -config FILE    (a VM's memory server; hostd starts these itself)
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"hostd/checkpoint/memserver"
	"hostd/hostd/config"
	"hostd/hostd/daemon"
	"hostd/hostd/logging"
	"hostd/xen"
	"hostd/xen/libvirt"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// Memory servers are this binary too: one executable to install, and a
	// memory server is always the version of the hostd that started it.
	if len(os.Args) > 1 && os.Args[1] == "memserve" {
		os.Exit(memserver.Main(os.Args[2:]))
	}
	cfgPath := flag.String("config", "/etc/hostd/hostd.toml", "configuration file (missing: all defaults)")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	cfg, err := config.Load(*cfgPath, true)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostd:", err)
		os.Exit(2)
	}
	level := new(slog.LevelVar)
	log := newLogger(cfg.Log, level)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// SIGHUP reloads (certificates, the log level) instead of ending hostd.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	err = daemon.Run(ctx, daemon.Options{
		Config: cfg, Log: log, Version: version, Reload: hup,
		// The keys that can change while hostd runs; the others need a
		// restart (which keeps the guests running).
		Reconfigure: func() error {
			c, err := config.Load(*cfgPath, true)
			if err != nil {
				return err
			}
			if err := level.UnmarshalText([]byte(c.Log.Level)); err != nil {
				return fmt.Errorf("log.level: %w", err)
			}
			return nil
		},
		NewHypervisor: func(ctx context.Context) (xen.Hypervisor, error) {
			return libvirt.New(ctx, libvirt.Config{
				URI:         cfg.Hypervisor.URI,
				Accel:       xen.Accel(cfg.Hypervisor.Accel),
				Logger:      log,
				ProbeKernel: cfg.Guest.Kernel,
				ProbeInitrd: cfg.Guest.Initrd,
				ProbeDir:    cfg.RunDir,
			})
		},
	})
	if err != nil {
		log.Error("hostd failed", "err", err)
		os.Exit(1)
	}
}

// newLogger logs to stderr; under systemd (hostd.service) each line carries
// its syslog priority for the journal.
func newLogger(c config.Log, level *slog.LevelVar) *slog.Logger {
	return logging.New(os.Stderr, logging.Options{Level: c.Level, Format: c.Format, Journal: logging.UnderJournal(os.Stderr), Var: level})
}
