package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"hostd/images/guest/agentapi"
)

// handle answers one request line.
func (a *agent) handle(line []byte) agentapi.Response {
	a.requests.Add(1)
	req, args, err := agentapi.DecodeRequest(line)
	if err != nil {
		return errorResponse(req.ID, err)
	}
	return a.dispatch(req, args)
}

// dispatch runs a decoded request; args is what DecodeRequest returned.
func (a *agent) dispatch(req agentapi.Request, args any) agentapi.Response {
	var (
		result any
		err    error
	)
	switch req.Cmd {
	case agentapi.CmdPing:
		result = agentapi.PingResult{Pong: true, UptimeMS: uptimeMS()}
	case agentapi.CmdDirty:
		result, err = a.startDirty(args.(agentapi.DirtyArgs))
	case agentapi.CmdStop:
		result, err = a.stopDirty(args.(agentapi.RegionArgs).Region)
	case agentapi.CmdChecksum:
		result, err = a.checksum(args.(agentapi.RegionArgs).Region)
	case agentapi.CmdOps:
		result, err = a.ops(args.(agentapi.RegionArgs).Region)
	case agentapi.CmdExpected:
		e := args.(agentapi.ExpectedArgs)
		var sum [32]byte
		sum, err = agentapi.ExpectedChecksum(e.SizeMiB, e.Seed, e.PassesDone, e.PageInPass)
		result = agentapi.ExpectedResult{SHA256: hex.EncodeToString(sum[:])}
	case agentapi.CmdEcho:
		result, err = a.echoCmd(args.(agentapi.EchoArgs))
	case agentapi.CmdProbe:
		result, err = probe(context.Background(), args.(agentapi.ProbeArgs))
	case agentapi.CmdMemInfo:
		var kib map[string]uint64
		kib, err = readMemInfo()
		result = agentapi.MemInfoResult{KiB: kib}
	case agentapi.CmdStats:
		result, err = a.stats()
	case agentapi.CmdSwapOn:
		result, err = swapOn(args.(agentapi.SwapArgs).Serial)
	case agentapi.CmdSwapOff:
		result, err = swapOff(args.(agentapi.SwapArgs).Serial)
	default:
		// DecodeRequest accepts only known commands; reaching this is a bug
		// in keeping the two lists in step.
		err = fmt.Errorf("dispatch %q: command not implemented", req.Cmd)
	}
	if err != nil {
		return errorResponse(req.ID, err)
	}
	return agentapi.Response{ID: req.ID, OK: true, Result: mustJSON(result)}
}

func errorResponse(id uint64, err error) agentapi.Response {
	return agentapi.Response{ID: id, OK: false, Error: err.Error()}
}

func (a *agent) stats() (agentapi.StatsResult, error) {
	mi, err := readMemInfo()
	if err != nil {
		return agentapi.StatsResult{}, err
	}
	a.mu.Lock()
	names := make([]string, 0, len(a.workloads))
	for n := range a.workloads {
		names = append(names, n)
	}
	var echoPort uint16
	if a.echo != nil {
		echoPort = a.echo.port
	}
	a.mu.Unlock()
	sort.Strings(names)
	mods, err := os.ReadFile("/proc/modules")
	if err != nil {
		return agentapi.StatsResult{}, fmt.Errorf("stats: %w", err)
	}
	var modules []string
	for _, l := range strings.Split(strings.TrimSpace(string(mods)), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			modules = append(modules, f[0])
		}
	}
	sort.Strings(modules)
	return agentapi.StatsResult{
		UptimeMS:        uptimeMS(),
		Kernel:          a.kernel,
		AgentVersion:    agentapi.Version,
		RequestsServed:  a.requests.Load(),
		Workloads:       names,
		EchoPort:        echoPort,
		MemTotalKiB:     mi["MemTotal"],
		MemAvailableKiB: mi["MemAvailable"],
		Goroutines:      runtime.NumGoroutine(),
		Modules:         modules,
	}, nil
}

// readMemInfo parses /proc/meminfo ("Name:   123 kB" lines).
func readMemInfo() (map[string]uint64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return nil, fmt.Errorf("meminfo: %w", err)
	}
	return parseMemInfo(string(b))
}

func parseMemInfo(text string) (map[string]uint64, error) {
	out := map[string]uint64{}
	for _, l := range strings.Split(text, "\n") {
		name, rest, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return nil, fmt.Errorf("meminfo: line %q has no value", l)
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("meminfo: line %q: %w", l, err)
		}
		out[name] = n
	}
	if _, ok := out["MemTotal"]; !ok {
		return nil, fmt.Errorf("meminfo: no MemTotal")
	}
	return out, nil
}
