package agentapi

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// ParseCompact turns the boot-time form of a command, "cmd,key=value,...",
// into the JSON request the agent would have received over the port, so
// both forms share one parser and one set of rules. Values that parse as
// unsigned integers become JSON numbers, everything else strings, except
// for the string-typed arguments (region, action, addr, proto), which stay strings even
// when they look like numbers.
func ParseCompact(s string) (Request, any, error) {
	if s == "" {
		return Request{}, nil, fmt.Errorf("parse compact command: empty: %w", ErrBadRequest)
	}
	parts := strings.Split(s, ",")
	args := map[string]any{}
	for _, kv := range parts[1:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return Request{}, nil, fmt.Errorf("parse compact command %q: %q is not key=value: %w", s, kv, ErrBadRequest)
		}
		if _, dup := args[k]; dup {
			return Request{}, nil, fmt.Errorf("parse compact command %q: %q given twice: %w", s, k, ErrBadRequest)
		}
		if n, err := strconv.ParseUint(v, 10, 64); err == nil && !stringArgs[k] {
			args[k] = n
		} else {
			args[k] = v
		}
	}
	req := Request{Cmd: parts[0]}
	if len(args) > 0 {
		raw, err := json.Marshal(args)
		if err != nil {
			return Request{}, nil, fmt.Errorf("parse compact command %q: %w", s, err)
		}
		req.Args = raw
	}
	line, err := json.Marshal(req)
	if err != nil {
		return Request{}, nil, fmt.Errorf("parse compact command %q: %w", s, err)
	}
	return DecodeRequest(line)
}

// stringArgs are the argument names whose JSON type is string.
var stringArgs = map[string]bool{"region": true, "action": true, "addr": true, "proto": true}

// BootOptions are the hostd.* options of the kernel command line.
type BootOptions struct {
	IP   string   // hostd.ip, a CIDR; empty: leave eth0 alone
	Echo uint16   // hostd.echo; 0: no echo server at boot
	Run  []string // hostd.run, compact commands in order
}

// ParseBootOptions extracts hostd.* options from /proc/cmdline text.
// Kernel command-line quoting ("...") is not needed by any option, so
// fields are split on white space.
func ParseBootOptions(cmdline string) (BootOptions, error) {
	var o BootOptions
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "hostd.ip":
			o.IP = v
		case "hostd.echo":
			p, err := strconv.ParseUint(v, 10, 16)
			if err != nil || p == 0 {
				return o, fmt.Errorf("parse boot options: hostd.echo=%q is not a port: %w", v, ErrBadRequest)
			}
			o.Echo = uint16(p)
		case "hostd.run":
			o.Run = append(o.Run, v)
		default:
			if strings.HasPrefix(k, "hostd.") {
				return o, fmt.Errorf("parse boot options: unknown option %q: %w", k, ErrBadRequest)
			}
		}
	}
	return o, nil
}

// Ready is the parsed readiness line.
type Ready struct {
	UptimeMS uint64
	Kernel   string
	Fields   map[string]string // every key=value, including the two above
}

// ParseReady parses a line containing ReadyPrefix followed by key=value
// fields. Text before the prefix (a console may interleave kernel output)
// is ignored.
func ParseReady(line string) (Ready, error) {
	_, rest, ok := strings.Cut(line, ReadyPrefix)
	if !ok {
		return Ready{}, fmt.Errorf("parse ready line: no %q in %q", ReadyPrefix, line)
	}
	r := Ready{Fields: map[string]string{}}
	for _, f := range strings.Fields(rest) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return Ready{}, fmt.Errorf("parse ready line: field %q is not key=value", f)
		}
		r.Fields[k] = v
	}
	up, ok := r.Fields["uptime_ms"]
	if !ok {
		return Ready{}, fmt.Errorf("parse ready line: no uptime_ms in %q", line)
	}
	n, err := strconv.ParseUint(up, 10, 64)
	if err != nil {
		return Ready{}, fmt.Errorf("parse ready line: uptime_ms: %w", err)
	}
	r.UptimeMS = n
	r.Kernel = r.Fields["kernel"]
	if r.Kernel == "" {
		return Ready{}, fmt.Errorf("parse ready line: no kernel in %q", line)
	}
	return r, nil
}
