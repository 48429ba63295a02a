package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"hostd/images/guest/agentapi"
)

// agent holds everything the request handlers share. There is one per
// process, created in main.
type agent struct {
	console *console
	kernel  string

	mu        sync.Mutex
	workloads map[string]*workload
	echo      *echoServer

	requests atomic.Uint64
}

func main() {
	ctx := context.Background()
	a := &agent{
		console:   openConsole(),
		kernel:    kernelRelease(),
		workloads: map[string]*workload{},
	}
	go a.sampleRates(ctx)

	fields, port := a.boot(ctx)
	a.console.printSync(agentapi.ReadyPrefix + " " + fields)

	if port != "" {
		servePort(ctx, a, port)
	}
	// Without a control port the guest still runs its boot workloads and
	// echo server; nothing is left to do but keep the process alive.
	select {}
}

// boot applies the hostd.* kernel options and returns the ready line's
// fields and the control port's device ("" if there is none). Problems are reported on the console and counted, never fatal:
// a guest that is up but misconfigured is easier to debug from the host
// than one that panicked.
func (a *agent) boot(ctx context.Context) (fields, port string) {
	var problems int
	report := func(err error) {
		problems++
		a.console.print("HOSTD-AGENT ERROR " + err.Error())
	}
	if err := a.watchPowerButton(); err != nil {
		report(err)
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		report(fmt.Errorf("read kernel command line: %w", err))
	}
	opts, err := agentapi.ParseBootOptions(string(cmdline))
	if err != nil {
		report(err)
	}
	ip := "none"
	if opts.IP != "" {
		if err := configureEth0(ctx, opts.IP); err != nil {
			report(err)
		} else {
			ip = opts.IP
		}
	}
	if opts.Echo != 0 {
		if _, err := a.startEcho(opts.Echo); err != nil {
			report(err)
		}
	}
	for _, run := range opts.Run {
		req, args, err := agentapi.ParseCompact(run)
		if err != nil {
			report(fmt.Errorf("hostd.run=%s: %w", run, err))
			continue
		}
		resp := a.dispatch(req, args)
		a.console.print(agentapi.ResultPrefix + " " + string(mustJSON(resp)))
		if !resp.OK {
			problems++
		}
	}
	port, err = findPort(ctx, agentapi.PortName, 3*time.Second)
	shown := port
	if err != nil {
		report(err)
		port, shown = "", "none"
	}
	fields = fmt.Sprintf("uptime_ms=%d kernel=%s ip=%s port=%s version=%d boot_errors=%d",
		uptimeMS(), a.kernel, ip, shown, agentapi.Version, problems)
	return fields, port
}

// uptimeMS reads /proc/uptime, the guest's own clock since boot, which is
// what a host compares against its create time.
func uptimeMS() uint64 {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	secs, _, _ := strings.Cut(string(b), " ")
	f, err := strconv.ParseFloat(secs, 64)
	if err != nil {
		return 0
	}
	return uint64(f * 1000)
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}
