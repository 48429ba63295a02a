package agentapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
)

// PortName is the name of the virtio-serial port the agent listens on.
const PortName = "org.hostd.agent.0"

// Version is the protocol version the agent reports in its ready line.
const Version = 1

// Serial-console prefixes.
const (
	ReadyPrefix  = "HOSTD-AGENT READY"
	ResultPrefix = "HOSTD-AGENT RESULT"
)

// Limits that keep one request from taking the guest down.
const (
	// MaxLineBytes bounds one request line.
	MaxLineBytes = 64 * 1024
	// MaxRegionMiB bounds one dirty region; the agent further checks
	// MemAvailable.
	MaxRegionMiB = 1 << 16
	// MaxRateMiBs bounds the requested write rate (0 means unpaced).
	MaxRateMiBs = 1 << 20
)

// Command names.
const (
	CmdPing     = "ping"
	CmdDirty    = "dirty"
	CmdStop     = "stop"
	CmdChecksum = "checksum"
	CmdOps      = "ops"
	CmdEcho     = "echo"
	CmdMemInfo  = "meminfo"
	CmdStats    = "stats"
	CmdExpected = "expected"
)

// Request is one line from the host.
type Request struct {
	ID   uint64          `json:"id"`
	Cmd  string          `json:"cmd"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is the agent's answer to one Request.
type Response struct {
	ID     uint64          `json:"id"`
	OK     bool            `json:"ok"`
	Error  string          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
}

// DirtyArgs starts a workload that writes the seeded pattern over a region.
type DirtyArgs struct {
	Region   string `json:"region"`
	SizeMiB  uint64 `json:"size_mib"`
	RateMiBs uint64 `json:"rate_mib_s"` // 0: as fast as it can
	Seed     uint64 `json:"seed"`
	Passes   uint64 `json:"passes"` // 0: until stopped
}

// RegionArgs names a region (stop, checksum, ops).
type RegionArgs struct {
	Region string `json:"region"`
}

// EchoArgs starts or stops the TCP+UDP echo server.
type EchoArgs struct {
	Action string `json:"action"` // "start" or "stop"
	Port   uint16 `json:"port"`   // required for start
}

// ExpectedArgs asks the agent to compute, without touching any region,
// the checksum a region would have (see ExpectedChecksum): the same answer
// a host computes, from the guest's own copy of the code.
type ExpectedArgs struct {
	SizeMiB    uint64 `json:"size_mib"`
	Seed       uint64 `json:"seed"`
	PassesDone uint64 `json:"passes_done"`
	PageInPass uint64 `json:"page_in_pass"`
}

// ExpectedResult answers expected.
type ExpectedResult struct {
	SHA256 string `json:"sha256"` // lowercase hex
}

// PingResult answers ping.
type PingResult struct {
	Pong     bool   `json:"pong"`
	UptimeMS uint64 `json:"uptime_ms"`
}

// WorkloadStatus describes a dirty workload; dirty, stop and ops return it.
type WorkloadStatus struct {
	Region   string `json:"region"`
	SizeMiB  uint64 `json:"size_mib"`
	Pages    uint64 `json:"pages"`
	Seed     uint64 `json:"seed"`
	RateMiBs uint64 `json:"rate_mib_s"`
	Passes   uint64 `json:"passes"` // requested; 0 = until stopped
	Running  bool   `json:"running"`
	// PassesDone and PageInPass locate the writer (see the package doc).
	PassesDone uint64 `json:"passes_done"`
	PageInPass uint64 `json:"page_in_pass"`
	// PagesTotal counts every page ever written by this workload; it only
	// grows, also across a checkpoint and restore of the VM.
	PagesTotal uint64 `json:"pages_total"`
	// PagesPerSec is the write rate over the agent's last sampling interval
	// (about one second).
	PagesPerSec float64 `json:"pages_per_s"`
	Error       string  `json:"error,omitempty"`
}

// ChecksumResult answers checksum.
type ChecksumResult struct {
	Region     string `json:"region"`
	SHA256     string `json:"sha256"` // lowercase hex
	SizeMiB    uint64 `json:"size_mib"`
	Seed       uint64 `json:"seed"`
	PassesDone uint64 `json:"passes_done"`
	PageInPass uint64 `json:"page_in_pass"`
	Running    bool   `json:"running"`
}

// EchoResult answers echo.
type EchoResult struct {
	Running bool   `json:"running"`
	Port    uint16 `json:"port,omitempty"`
}

// MemInfoResult answers meminfo: /proc/meminfo, values in KiB (the
// HugePages_* counts, which have no unit, are passed through as counts).
type MemInfoResult struct {
	KiB map[string]uint64 `json:"kib"`
}

// StatsResult answers stats.
type StatsResult struct {
	UptimeMS        uint64   `json:"uptime_ms"`
	Kernel          string   `json:"kernel"`
	AgentVersion    int      `json:"agent_version"`
	RequestsServed  uint64   `json:"requests_served"`
	Workloads       []string `json:"workloads"`
	EchoPort        uint16   `json:"echo_port,omitempty"`
	MemTotalKiB     uint64   `json:"mem_total_kib"`
	MemAvailableKiB uint64   `json:"mem_available_kib"`
	Goroutines      int      `json:"goroutines"`
	// Modules lists the loaded kernel modules (/proc/modules), so a host
	// can tell that /init loaded every driver it expects.
	Modules []string `json:"modules"`
}

// regionName keeps names short and printable: they appear in logs and in
// the compact boot-time syntax.
var regionName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// ErrBadRequest marks every request-validation error.
var ErrBadRequest = errors.New("bad request")

// DecodeRequest parses and validates one request line. The returned value
// is one of the *Args types (nil for commands without arguments). The
// Request is returned even on error when its id could be read, so the
// agent can echo the id in the error response.
func DecodeRequest(line []byte) (Request, any, error) {
	var req Request
	if len(line) > MaxLineBytes {
		return req, nil, fmt.Errorf("decode request: line of %d bytes exceeds %d: %w", len(line), MaxLineBytes, ErrBadRequest)
	}
	if err := strictUnmarshal(line, &req); err != nil {
		return req, nil, fmt.Errorf("decode request: %v: %w", err, ErrBadRequest)
	}
	args, err := decodeArgs(req.Cmd, req.Args)
	if err != nil {
		return req, nil, fmt.Errorf("decode request %d: %w", req.ID, err)
	}
	return req, args, nil
}

func decodeArgs(cmd string, raw json.RawMessage) (any, error) {
	empty := len(bytes.TrimSpace(raw)) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null"))
	switch cmd {
	case CmdPing, CmdMemInfo, CmdStats:
		if !empty && !bytes.Equal(bytes.TrimSpace(raw), []byte("{}")) {
			return nil, fmt.Errorf("%s takes no args: %w", cmd, ErrBadRequest)
		}
		return nil, nil
	case CmdDirty:
		var a DirtyArgs
		if err := decodeInto(cmd, raw, empty, &a); err != nil {
			return nil, err
		}
		return a, a.Validate()
	case CmdStop, CmdChecksum, CmdOps:
		var a RegionArgs
		if err := decodeInto(cmd, raw, empty, &a); err != nil {
			return nil, err
		}
		return a, validRegion(cmd, a.Region)
	case CmdExpected:
		var a ExpectedArgs
		if err := decodeInto(cmd, raw, empty, &a); err != nil {
			return nil, err
		}
		return a, a.Validate()
	case CmdEcho:
		var a EchoArgs
		if err := decodeInto(cmd, raw, empty, &a); err != nil {
			return nil, err
		}
		return a, a.Validate()
	case "":
		return nil, fmt.Errorf("missing cmd: %w", ErrBadRequest)
	default:
		return nil, fmt.Errorf("unknown command %q: %w", cmd, ErrBadRequest)
	}
}

func decodeInto(cmd string, raw json.RawMessage, empty bool, v any) error {
	if empty {
		return fmt.Errorf("%s: missing args: %w", cmd, ErrBadRequest)
	}
	if err := strictUnmarshal(raw, v); err != nil {
		return fmt.Errorf("%s args: %v: %w", cmd, err, ErrBadRequest)
	}
	return nil
}

// strictUnmarshal rejects unknown fields and trailing data, so a typo in a
// field name is an error rather than a silently defaulted value.
func strictUnmarshal(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

// Validate checks a dirty request.
func (a DirtyArgs) Validate() error {
	if err := validRegion(CmdDirty, a.Region); err != nil {
		return err
	}
	if a.SizeMiB == 0 || a.SizeMiB > MaxRegionMiB {
		return fmt.Errorf("dirty: size_mib %d not in [1, %d]: %w", a.SizeMiB, MaxRegionMiB, ErrBadRequest)
	}
	if a.RateMiBs > MaxRateMiBs {
		return fmt.Errorf("dirty: rate_mib_s %d above %d: %w", a.RateMiBs, MaxRateMiBs, ErrBadRequest)
	}
	return nil
}

// Validate checks an expected request.
func (a ExpectedArgs) Validate() error {
	if a.SizeMiB == 0 || a.SizeMiB > MaxRegionMiB {
		return fmt.Errorf("expected: size_mib %d not in [1, %d]: %w", a.SizeMiB, MaxRegionMiB, ErrBadRequest)
	}
	if a.PageInPass >= a.SizeMiB*PagesPerMiB {
		return fmt.Errorf("expected: page_in_pass %d not below %d pages: %w", a.PageInPass, a.SizeMiB*PagesPerMiB, ErrBadRequest)
	}
	return nil
}

// Validate checks an echo request.
func (a EchoArgs) Validate() error {
	switch a.Action {
	case "start":
		if a.Port == 0 {
			return fmt.Errorf("echo start: port must be 1-65535: %w", ErrBadRequest)
		}
	case "stop":
	default:
		return fmt.Errorf("echo: action %q is neither start nor stop: %w", a.Action, ErrBadRequest)
	}
	return nil
}

func validRegion(cmd, name string) error {
	if !regionName.MatchString(name) {
		return fmt.Errorf("%s: region %q must be 1-64 of [A-Za-z0-9_.-]: %w", cmd, name, ErrBadRequest)
	}
	return nil
}
