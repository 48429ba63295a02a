package main

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"time"

	"hostd/hostd/config"
	"hostd/hostd/protect"
)

// protection runs the memory-protection commands.
func (a *cli) protection(ctx context.Context, cmd string, args []string) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	backup := fs.String("backup", "", "protect: backup host:port")
	id := fs.String("id", "", "protect: the VM's id at the backup (default its name)")
	bound := fs.Duration("bound", 0, "protect: evacuation bound T (default: the host's)")
	epoch := fs.Duration("epoch", 0, "protect: crash-consistent epoch interval (0: none)")
	weight := fs.Float64("weight", 0, "protect: share of the host's backup bandwidth (default 1)")
	within := fs.Duration("within", 0, "evacuate: deadline from now (default: the VM's bound)")
	deadline := fs.String("deadline", "", "evacuate: deadline as RFC 3339")
	after := fs.String("after", "", "evacuate: pause (default), destroy or resume")
	wait := fs.Bool("wait", false, "wait for the job")
	mode := fs.String("mode", "lazy", "restore: lazy or full")
	as := fs.String("name", "", "restore: name on this host (default: the id)")
	epochN := fs.Uint64("restore-point", 0, "restore: epoch (default: the latest)")
	prefetch := fs.Float64("prefetch-rate", 0, "restore: prefetch bytes/s (0: unlimited)")
	slot := fs.String("slot", "auto", "restore: auto (into a warm slot that fits, if one is ready) or cold")
	name, rest := "", args
	if len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		name, rest = rest[0], rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return usageError{err.Error()}
	}
	if name == "" && cmd != "protection" && cmd != "evacuate-host" {
		return usageError{cmd + ": NAME is required"}
	}
	ereq := protect.EvacuateRequest{After: protect.After(*after)}
	switch {
	case *deadline != "":
		t, err := time.Parse(time.RFC3339Nano, *deadline)
		if err != nil {
			return usageError{fmt.Sprintf("%s: -deadline %q is not RFC 3339", cmd, *deadline)}
		}
		ereq.Deadline = t
	case *within > 0:
		ereq.Deadline = time.Now().Add(*within)
	}
	switch cmd {
	case "protect":
		req := protect.Request{Backup: *backup, ID: *id, EpochInterval: config.Duration{Duration: *epoch}, Weight: *weight}
		if *bound != 0 {
			req.Bound = &config.Duration{Duration: *bound} // unset: the host's default
		}
		j, err := a.c.Protect(ctx, name, req)
		if err == nil && *wait {
			j, err = a.c.WaitJob(ctx, j.ID)
		}
		return a.jobOut(j, err)
	case "unprotect":
		if err := a.c.Unprotect(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "%s is no longer protected\n", name)
		return nil
	case "protection":
		var l []protect.Status
		if name != "" {
			s, err := a.c.Protection(ctx, name)
			if err != nil {
				return err
			}
			l = []protect.Status{s}
		} else {
			var err error
			if l, err = a.c.ListProtection(ctx); err != nil {
				return err
			}
		}
		if a.json {
			return a.printJSON(l)
		}
		rows := make([][]string, 0, len(l))
		for _, s := range l {
			rows = append(rows, []string{s.VM, string(s.State), s.Backup,
				fmt.Sprintf("%.1f MiB", float64(s.UnflushedBytes)/(1<<20)), fmt.Sprintf("%.1f MiB", float64(s.CapBytes)/(1<<20)),
				fmt.Sprintf("%.1f MB/s", s.BandwidthBps/1e6), fmt.Sprintf("%.0f ms", s.BoundMS), fmt.Sprintf("%.0f ms", s.HeadroomMS),
				fmt.Sprint(s.RestorableEpoch), s.Reason})
		}
		return a.table([]string{"VM", "STATE", "BACKUP", "UNFLUSHED", "CAP", "BANDWIDTH", "BOUND", "HEADROOM", "RESTORE POINT", "REASON"}, rows)
	case "evacuate":
		j, err := a.c.Evacuate(ctx, name, ereq)
		if err == nil && *wait {
			j, err = a.c.WaitJob(ctx, j.ID)
		}
		return a.jobOut(j, err)
	case "evacuate-host":
		j, err := a.c.EvacuateHost(ctx, ereq)
		if err == nil && *wait {
			j, err = a.c.WaitJob(ctx, j.ID)
		}
		return a.jobOut(j, err)
	case "restore":
		j, err := a.c.Restore(ctx, protect.RestoreRequest{Backup: *backup, ID: name, Name: *as, Epoch: *epochN, Mode: *mode, PrefetchRate: *prefetch, Slot: *slot})
		if err == nil && *wait {
			j, err = a.c.WaitJob(ctx, j.ID)
		}
		return a.jobOut(j, err)
	case "epoch":
		r, err := a.c.Epoch(ctx, name)
		if err != nil {
			return err
		}
		return a.printJSON(r)
	}
	return usageError{fmt.Sprintf("unknown command %q", cmd)}
}
