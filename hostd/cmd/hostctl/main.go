// Command hostctl drives hostd over its socket: the scheduler's API as a CLI.
//
//	hostctl [-socket PATH] [-json] host
//	hostctl vm list | get NAME | create NAME [flags] | start NAME | shutdown NAME [-timeout D] [-wait]
//	hostctl vm destroy NAME | delete NAME | console NAME [-n LINES] | stats NAME | wait-ready NAME [-timeout D]
//	hostctl connector list | get ID | create ID A B | retarget ID A B | delete ID | stats ID
//	  (an endpoint is HOST[/VM[/NIC]], e.g. 10.0.0.1/web/0)
//	hostctl protect NAME -backup HOST:PORT [-bound 30s] [-epoch 0s] [-weight 1] [-wait] | unprotect NAME
//	hostctl protection [NAME] | evacuate NAME [-deadline RFC3339 | -within D] [-after pause|destroy|resume] [-wait]
//	hostctl epoch NAME | evacuate-host [-within D] [-wait]
//	hostctl restore ID -backup HOST:PORT [-name N] [-mode lazy|full] [-restore-point E] [-prefetch-rate B] [-slot auto|cold] [-wait]
//	hostctl job list | get ID | wait ID
//	hostctl events
//	hostctl metrics
//	hostctl version | hostctl --version
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"hostd/hostd/client"
	"hostd/hostd/connector"
	"hostd/hostd/jobs"
	"hostd/hostd/vm"
	"hostd/images/guest/agentclient"
	"hostd/xen"
)

// version is set at build time with -ldflags "-X main.version=..." (the
// Makefile stamps hostd and hostctl with the same one, see images/deb/version.sh).
var version = "dev"

type cli struct {
	c    *client.Client
	json bool
	out  io.Writer
}

func main() {
	socket := flag.String("socket", envOr("HOSTD_SOCKET", "/run/hostd/hostd.sock"), "hostd's API socket ($HOSTD_SOCKET)")
	asJSON := flag.Bool("json", false, "print JSON instead of tables")
	showVersion := flag.Bool("version", false, "print hostctl's version and exit (hostd's: hostctl host)")
	flag.Usage = usage
	flag.Parse()
	if *showVersion || (flag.NArg() == 1 && flag.Arg(0) == "version") {
		fmt.Println(version)
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	app := &cli{c: client.New(*socket), json: *asJSON, out: os.Stdout}
	if err := app.run(ctx, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "hostctl:", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: hostctl [-socket PATH] [-json] COMMAND
       hostctl --version | version      this hostctl's version (hostd's: hostctl host)

  host                                  hypervisor, accelerator, CPU, memory, version
  vm list                               all VMs
  vm get NAME                           one VM
  vm create NAME [-memory MiB] [-vcpus N] [-kernel F] [-initrd F] [-cmdline S] [-nic TAP[,MAC]]... [-served] [-no-start]
  vm start|destroy|delete|stats NAME
  vm shutdown NAME [-timeout 60s] [-wait]
  vm console NAME [-n 50]
  vm wait-ready NAME [-timeout 2m]      wait until the guest agent announced itself
  vm agent NAME CMD [JSON]              call the guest agent (test guest: dirty, ops, checksum, ...)
  vm verify NAME REGION...              check guest region checksums against the seeded pattern
  connector list | get ID | delete ID | stats ID
  connector create|retarget ID A B      endpoints as HOST[/VM[/NIC]], e.g. 10.0.0.1/web/0
  protect NAME -backup HOST:PORT [-bound 30s] [-epoch 0s] [-weight 1] [-wait]
                                        checkpoint a VM (created with -served) to a backup
  unprotect NAME                        stop checkpointing
  protection [NAME]                     state, unflushed bytes, cap, bandwidth, headroom
  evacuate NAME [-within D | -deadline T] [-after pause|destroy|resume] [-wait]
                                        pause, final flush, device state, restorable commit
  evacuate-host [-within D] [-wait]     evacuate every protected VM at once
  epoch NAME                            take a crash-consistent restore point now
  restore ID -backup HOST:PORT [-name N] [-mode lazy|full] [-prefetch-rate B/s] [-slot auto|cold] [-wait]
                                        bring a VM back from a backup (job ends when fully resident)
  swap [NAME]                           swap devices: pages remote/local, ops/s, overload, repositories
  swap NAME -size MiB -repos H:P[,H:P]  give a running VM a cooperative swap device (guest: vm agent NAME swapon '{"serial":"hostd-swap"}')
  swap NAME -delete                     unplug and remove it (swapoff in the guest first)
  memory NAME TARGET_MIB                set the balloon target
  repo                                  the page repository (repo role): capacity, use per client
  job list | job get ID | job wait ID
  events                                stream events (one JSON object per line)
  metrics                               Prometheus metrics
`)
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg + " (hostctl -h for usage)" }

func (a *cli) run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usageError{"no command"}
	}
	switch args[0] {
	case "host":
		h, err := a.c.Host(ctx)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(h)
		}
		rows := [][]string{
			{"version", h.Version}, {"roles", strings.Join(h.Roles, ",")},
			{"hypervisor", h.Hypervisor}, {"library", h.Library}, {"uri", h.URI}, {"accel", string(h.Accel)},
			{"cpu", fmt.Sprintf("%s (%d CPUs)", h.CPUModel, h.CPUs)},
			{"memory", fmt.Sprintf("%d MiB (%d free)", h.MemoryMiB, h.FreeMemoryMiB)},
		}
		for _, s := range h.WarmSlots {
			v := fmt.Sprintf("%d MiB, %d vCPUs: %d of %d ready, %d starting, %d claimed", s.MemoryMiB, s.VCPUs, s.Ready, s.Count, s.Filling, s.Claims)
			if s.LastError != "" {
				v += "; last error: " + s.LastError
			}
			rows = append(rows, []string{"warm slot", v})
		}
		return a.table([]string{"FIELD", "VALUE"}, rows)
	case "vm":
		return a.vm(ctx, args[1:])
	case "job":
		return a.job(ctx, args[1:])
	case "connector":
		return a.connector(ctx, args[1:])
	case "protect", "unprotect", "protection", "evacuate", "evacuate-host", "epoch", "restore":
		return a.protection(ctx, args[0], args[1:])
	case "swap", "memory", "repo":
		return a.swap(ctx, args[0], args[1:])
	case "events":
		ch, err := a.c.Events(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil // the user stopped it (Ctrl-C) before the stream began
			}
			return err
		}
		enc := json.NewEncoder(a.out)
		for e := range ch {
			if err := enc.Encode(e); err != nil {
				return err
			}
		}
		// The stream ends by itself only when hostd goes away: a watcher
		// must learn that from the exit code, not take it for the end.
		if ctx.Err() == nil {
			return errors.New("events: hostd closed the stream (it stopped or restarted); run hostctl events again once it answers")
		}
		return nil
	case "metrics":
		m, err := a.c.Metrics(ctx)
		if err != nil {
			return err
		}
		_, err = io.WriteString(a.out, m)
		return err
	default:
		return usageError{fmt.Sprintf("unknown command %q", args[0])}
	}
}

func (a *cli) vm(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usageError{"vm: which subcommand?"}
	}
	sub, args := args[0], args[1:]
	if sub == "list" {
		vms, err := a.c.ListVMs(ctx)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(vms)
		}
		rows := make([][]string, 0, len(vms))
		for _, v := range vms {
			rows = append(rows, vmRow(v))
		}
		return a.table(vmHeader, rows)
	}

	fs := flag.NewFlagSet("vm "+sub, flag.ContinueOnError)
	memory := fs.Uint64("memory", 0, "memory in MiB (default 256)")
	vcpus := fs.Int("vcpus", 0, "virtual CPUs (default 1)")
	kernel := fs.String("kernel", "", "kernel (default: the configured guest image)")
	initrd := fs.String("initrd", "", "initrd")
	cmdline := fs.String("cmdline", "", "kernel command line")
	noStart := fs.Bool("no-start", false, "define only")
	served := fs.Bool("served", false, "RAM served by hostd (needed for protection)")
	var nics nicFlags
	fs.Var(&nics, "nic", "TAP[,MAC] (repeatable)")
	timeout := fs.Duration("timeout", 0, "shutdown: ACPI timeout; wait-ready: how long to wait")
	wait := fs.Bool("wait", false, "shutdown: wait for the job")
	lines := fs.Int("n", 50, "console: last N lines (0: last MiB)")
	// Accept flags after the name as well as before it.
	name, rest := "", args
	if len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		name, rest = rest[0], rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return usageError{err.Error()}
	}
	if name == "" && fs.NArg() > 0 {
		name = fs.Arg(0)
	}
	if name == "" {
		return usageError{"vm " + sub + ": NAME is required"}
	}

	switch sub {
	case "get":
		v, err := a.c.VM(ctx, name)
		return a.vmOut(v, err)
	case "create":
		start := !*noStart
		v, err := a.c.CreateVM(ctx, vm.Request{Name: name, MemoryMiB: *memory, VCPUs: *vcpus,
			Kernel: *kernel, Initrd: *initrd, Cmdline: *cmdline, NICs: nics, Start: &start, ServedMemory: *served})
		return a.vmOut(v, err)
	case "start":
		v, err := a.c.StartVM(ctx, name)
		return a.vmOut(v, err)
	case "destroy":
		v, err := a.c.DestroyVM(ctx, name)
		return a.vmOut(v, err)
	case "delete":
		if err := a.c.DeleteVM(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "deleted %s\n", name)
		return nil
	case "shutdown":
		j, err := a.c.ShutdownVM(ctx, name, *timeout)
		if err == nil && *wait {
			j, err = a.c.WaitJob(ctx, j.ID)
		}
		return a.jobOut(j, err)
	case "console":
		out, err := a.c.Console(ctx, name, *lines)
		if err != nil {
			return err
		}
		_, err = a.out.Write(out)
		return err
	case "stats":
		s, err := a.c.Stats(ctx, name)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(s)
		}
		return a.table([]string{"CPU", "MEMORY", "BALLOON", "RSS"}, [][]string{{
			s.CPUTime.String(), fmt.Sprintf("%d MiB", s.MemoryMiB), fmt.Sprintf("%d MiB", s.BalloonMiB), fmt.Sprintf("%d MiB", s.RSSMiB)}})
	case "agent":
		// The guest agent's socket is a local file: hostctl runs beside hostd.
		v, err := a.c.VM(ctx, name)
		if err != nil {
			return err
		}
		if fs.NArg() < 1 {
			return usageError{"vm agent NAME CMD [JSON-ARGS]"}
		}
		var args any
		if fs.NArg() > 1 {
			args = json.RawMessage(fs.Arg(1))
		}
		ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
		if err != nil {
			return err
		}
		defer ac.Close()
		var out json.RawMessage
		if err := ac.Call(ctx, fs.Arg(0), args, &out); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "%s\n", out)
		return nil
	case "verify":
		// Region checksums computed in the guest against the host's own
		// recomputation of the seeded pattern.
		v, err := a.c.VM(ctx, name)
		if err != nil {
			return err
		}
		ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
		if err != nil {
			return err
		}
		defer ac.Close()
		for _, region := range fs.Args() {
			r, err := ac.VerifyChecksum(ctx, region)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "%s: region %s sha256 %s matches the expected pattern (seed %d, %d passes + %d pages)\n",
				name, region, r.SHA256[:16], r.Seed, r.PassesDone, r.PageInPass)
		}
		return nil
	case "wait-ready":
		if *timeout == 0 {
			*timeout = 2 * time.Minute
		}
		wctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		v, err := a.c.WaitReady(wctx, name)
		return a.vmOut(v, err)
	default:
		return usageError{fmt.Sprintf("vm: unknown subcommand %q", sub)}
	}
}

func (a *cli) job(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usageError{"job: which subcommand?"}
	}
	switch {
	case args[0] == "list":
		js, err := a.c.Jobs(ctx)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(js)
		}
		rows := make([][]string, 0, len(js))
		for _, j := range js {
			rows = append(rows, jobRow(j))
		}
		return a.table(jobHeader, rows)
	case len(args) < 2:
		return usageError{"job " + args[0] + ": ID is required"}
	case args[0] == "get":
		j, err := a.c.Job(ctx, args[1])
		return a.jobOut(j, err)
	case args[0] == "wait":
		j, err := a.c.WaitJob(ctx, args[1])
		return a.jobOut(j, err)
	default:
		return usageError{fmt.Sprintf("job: unknown subcommand %q", args[0])}
	}
}

func (a *cli) connector(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usageError{"connector: which subcommand?"}
	}
	if args[0] == "list" {
		cs, err := a.c.Connectors(ctx)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(cs)
		}
		rows := make([][]string, 0, len(cs))
		for _, c := range cs {
			rows = append(rows, connRow(c))
		}
		return a.table(connHeader, rows)
	}
	if len(args) < 2 {
		return usageError{"connector " + args[0] + ": ID is required"}
	}
	id64, err := strconv.ParseUint(args[1], 10, 32)
	if err != nil {
		return usageError{fmt.Sprintf("connector %s: ID %q is not a number", args[0], args[1])}
	}
	id := uint32(id64)
	switch args[0] {
	case "get":
		c, err := a.c.Connector(ctx, id)
		return a.connOut(c, err)
	case "create", "retarget":
		if len(args) != 4 {
			return usageError{"connector " + args[0] + ": want ID A B"}
		}
		spec := connector.Spec{ID: id}
		if spec.A, err = parseEndpoint(args[2]); err != nil {
			return err
		}
		if spec.B, err = parseEndpoint(args[3]); err != nil {
			return err
		}
		var c connector.Record
		if args[0] == "create" {
			c, err = a.c.CreateConnector(ctx, spec)
		} else {
			c, err = a.c.RetargetConnector(ctx, spec)
		}
		return a.connOut(c, err)
	case "delete":
		if err := a.c.DeleteConnector(ctx, id); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "deleted connector %d\n", id)
		return nil
	case "stats":
		st, err := a.c.ConnectorStats(ctx, id)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(st)
		}
		return a.table([]string{"TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES", "DROPS"}, [][]string{{
			fmt.Sprint(st.TxPackets), fmt.Sprint(st.TxBytes), fmt.Sprint(st.RxPackets), fmt.Sprint(st.RxBytes), fmt.Sprint(st.Drops)}})
	default:
		return usageError{fmt.Sprintf("connector: unknown subcommand %q", args[0])}
	}
}

// parseEndpoint reads HOST[/VM[/NIC]].
func parseEndpoint(s string) (connector.Endpoint, error) {
	parts := strings.Split(s, "/")
	if len(parts) > 3 || parts[0] == "" {
		return connector.Endpoint{}, usageError{fmt.Sprintf("endpoint %q: want HOST[/VM[/NIC]]", s)}
	}
	e := connector.Endpoint{Host: parts[0]}
	if len(parts) > 1 {
		e.VM = parts[1]
	}
	if len(parts) > 2 {
		n, err := strconv.Atoi(parts[2])
		if err != nil {
			return e, usageError{fmt.Sprintf("endpoint %q: NIC %q is not a number", s, parts[2])}
		}
		e.NIC = n
	}
	return e, nil
}

var connHeader = []string{"ID", "A", "B", "LOCAL TAPS", "MTU", "COLLAPSED"}

func connRow(c connector.Record) []string {
	ep := func(e connector.Endpoint) string { return fmt.Sprintf("%s/%s/%d", e.Host, e.VM, e.NIC) }
	var taps []string
	for _, d := range []string{c.Dataplane.A.Device, c.Dataplane.B.Device} {
		if d != "" {
			taps = append(taps, d)
		}
	}
	return []string{fmt.Sprint(c.ID), ep(c.A), ep(c.B), strings.Join(taps, ","), fmt.Sprint(c.MTU), fmt.Sprint(c.Collapsed)}
}

func (a *cli) connOut(c connector.Record, err error) error {
	if err != nil {
		return err
	}
	if a.json {
		return a.printJSON(c)
	}
	return a.table(connHeader, [][]string{connRow(c)})
}

var vmHeader = []string{"NAME", "STATE", "VCPUS", "MEMORY", "BOOT", "CREATED"}

func vmRow(v vm.VM) []string {
	state := string(v.State)
	if v.Vanished {
		state = "vanished"
	}
	boot := "-"
	if v.Ready != nil {
		boot = fmt.Sprintf("%.0f ms", v.BootMS)
	}
	return []string{v.Name, state, fmt.Sprint(v.Spec.VCPUs), fmt.Sprintf("%d MiB", v.Spec.MemoryMiB), boot, v.Created.Format(time.RFC3339)}
}

var jobHeader = []string{"ID", "KIND", "VM", "STATE", "PROGRESS", "ERROR"}

func jobRow(j jobs.Job) []string {
	return []string{j.ID, j.Kind, j.VM, string(j.State), fmt.Sprintf("%.0f%%", j.Progress*100), j.Error}
}

func (a *cli) vmOut(v vm.VM, err error) error {
	if err != nil {
		return err
	}
	if a.json {
		return a.printJSON(v)
	}
	return a.table(vmHeader, [][]string{vmRow(v)})
}

func (a *cli) jobOut(j jobs.Job, err error) error {
	if err != nil {
		return err
	}
	var err2 error
	if a.json {
		err2 = a.printJSON(j)
	} else {
		err2 = a.table(jobHeader, [][]string{jobRow(j)})
	}
	if err2 != nil {
		return err2
	}
	// A failed job fails the command in either format: a script that
	// asked for JSON still learns from the exit code.
	if j.State == jobs.Failed || j.State == jobs.Interrupted {
		return fmt.Errorf("job %s %s (%s): %s", j.ID, j.State, j.Code, j.Error)
	}
	return nil
}

func (a *cli) printJSON(v any) error {
	enc := json.NewEncoder(a.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *cli) table(header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

type nicFlags []xen.NIC

func (n *nicFlags) String() string { return fmt.Sprint(*n) }
func (n *nicFlags) Set(s string) error {
	tap, mac, _ := strings.Cut(s, ",")
	if tap == "" {
		return errors.New("-nic wants TAP[,MAC]")
	}
	*n = append(*n, xen.NIC{Tap: tap, MAC: mac})
	return nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
