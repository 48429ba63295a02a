package agentapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
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
	CmdProbe    = "probe"
	CmdSwapOn   = "swapon"
	CmdSwapOff  = "swapoff"
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
	// Swappable leaves the region unlocked, so the kernel may page it out
	// to swap: a working set larger than the (ballooned) RAM. The size is
	// then checked against MemAvailable plus SwapFree.
	Swappable bool `json:"swappable,omitempty"`
}

// SwapArgs names a swap disk by its serial number (what the host set,
// seen in /sys/block/vdX/serial): swapon runs mkswap on it and turns it
// on; swapoff turns it off.
type SwapArgs struct {
	Serial string `json:"serial"`
}

// SwapResult answers swapon and swapoff.
type SwapResult struct {
	Device  string `json:"device"` // e.g. /dev/vdb
	SizeKiB uint64 `json:"size_kib"`
	// SwapTotalKiB is the guest's total swap afterwards (/proc/meminfo).
	SwapTotalKiB uint64 `json:"swap_total_kib"`
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

// Probe limits: a probe holds the agent's port until it ends (requests are
// answered in order), so its worst case, Count*(IntervalMS+TimeoutMS), is
// bounded too.
const (
	MaxProbeCount      = 10000
	MaxProbeIntervalMS = 10000
	MaxProbeTimeoutMS  = 30000
	MaxProbeTotalMS    = 300000
	// MinProbeSize leaves room for the probe's sequence header.
	MinProbeSize = 16
	// MaxProbeSizeUDP is the largest UDP payload over IPv4; TCP probes may
	// be as large as MaxProbeSizeTCP.
	MaxProbeSizeUDP = 65507
	MaxProbeSizeTCP = 1 << 20
)

// ProbeArgs sends Count echo requests of Size bytes to an echo server
// (another guest's hostd.echo, say) and measures what comes back: how a
// test checks connectivity between two guests from inside one of them.
type ProbeArgs struct {
	Addr  string `json:"addr"`  // "ip:port" ("[ip6]:port" for IPv6)
	Proto string `json:"proto"` // "udp" or "tcp"
	Count uint32 `json:"count"`
	// IntervalMS is the pause after each probe's echo (or timeout); 0
	// sends the next probe at once.
	IntervalMS uint32 `json:"interval_ms"`
	// TimeoutMS is how long one probe waits for its echo (TCP: including
	// a reconnect after a lost probe).
	TimeoutMS uint32 `json:"timeout_ms"`
	// Size is the payload of one probe: the UDP datagram, or the bytes
	// written to (and read back from) the TCP stream.
	Size uint32 `json:"size"`
}

// ProbeResult answers probe. RTTs are of the probes that were answered,
// in microseconds; all zero when none was.
type ProbeResult struct {
	Addr     string `json:"addr"`
	Proto    string `json:"proto"`
	Size     uint32 `json:"size"`
	Sent     uint32 `json:"sent"`
	Received uint32 `json:"received"`
	Lost     uint32 `json:"lost"`
	// Mismatched counts echoes whose contents differed from the probe
	// (they are also counted as lost).
	Mismatched uint32 `json:"mismatched"`
	// Connects counts TCP connections made: 1 when no probe was lost.
	Connects  uint32 `json:"connects,omitempty"`
	RTTUsMin  uint64 `json:"rtt_us_min"`
	RTTUsP50  uint64 `json:"rtt_us_p50"`
	RTTUsP90  uint64 `json:"rtt_us_p90"`
	RTTUsMax  uint64 `json:"rtt_us_max"`
	LocalAddr string `json:"local_addr,omitempty"` // the guest's source ip:port
	// PathMTU is the kernel's MTU towards Addr (IP_MTU of the socket):
	// the guest's eth0 MTU unless a route or PMTU says less.
	PathMTU int `json:"path_mtu,omitempty"`
	// LastError is the last send or receive error, if any probe had one.
	LastError string `json:"last_error,omitempty"`
	ElapsedMS uint64 `json:"elapsed_ms"`
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
	case CmdSwapOn, CmdSwapOff:
		var a SwapArgs
		if err := decodeInto(cmd, raw, empty, &a); err != nil {
			return nil, err
		}
		return a, a.Validate(cmd)
	case CmdProbe:
		var a ProbeArgs
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

var serialRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,20}$`)

// Validate checks a swapon or swapoff request.
func (a SwapArgs) Validate(cmd string) error {
	if !serialRE.MatchString(a.Serial) {
		return fmt.Errorf("%s: serial %q: 1 to 20 letters, digits, '.', '_' or '-': %w", cmd, a.Serial, ErrBadRequest)
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

// Validate checks a probe request.
func (a ProbeArgs) Validate() error {
	ap, err := netip.ParseAddrPort(a.Addr)
	if err != nil {
		return fmt.Errorf("probe: addr %q is not ip:port: %v: %w", a.Addr, err, ErrBadRequest)
	}
	if ip := ap.Addr(); ap.Port() == 0 || ip.IsUnspecified() || ip.IsMulticast() || ip.Zone() != "" {
		return fmt.Errorf("probe: addr %q must be a unicast ip (no zone) and a port 1-65535: %w", a.Addr, ErrBadRequest)
	}
	maxSize := uint32(0)
	switch a.Proto {
	case "udp":
		maxSize = MaxProbeSizeUDP
	case "tcp":
		maxSize = MaxProbeSizeTCP
	default:
		return fmt.Errorf("probe: proto %q is neither udp nor tcp: %w", a.Proto, ErrBadRequest)
	}
	if a.Count == 0 || a.Count > MaxProbeCount {
		return fmt.Errorf("probe: count %d not in [1, %d]: %w", a.Count, MaxProbeCount, ErrBadRequest)
	}
	if a.IntervalMS > MaxProbeIntervalMS {
		return fmt.Errorf("probe: interval_ms %d above %d: %w", a.IntervalMS, MaxProbeIntervalMS, ErrBadRequest)
	}
	if a.TimeoutMS == 0 || a.TimeoutMS > MaxProbeTimeoutMS {
		return fmt.Errorf("probe: timeout_ms %d not in [1, %d]: %w", a.TimeoutMS, MaxProbeTimeoutMS, ErrBadRequest)
	}
	if a.Size < MinProbeSize || a.Size > maxSize {
		return fmt.Errorf("probe: size %d not in [%d, %d] for %s: %w", a.Size, MinProbeSize, maxSize, a.Proto, ErrBadRequest)
	}
	if total := uint64(a.Count) * uint64(a.IntervalMS+a.TimeoutMS); total > MaxProbeTotalMS {
		return fmt.Errorf("probe: count*(interval_ms+timeout_ms) = %d ms exceeds %d ms; the agent answers nothing else meanwhile, send fewer or shorter probes: %w",
			total, MaxProbeTotalMS, ErrBadRequest)
	}
	return nil
}

func validRegion(cmd, name string) error {
	if !regionName.MatchString(name) {
		return fmt.Errorf("%s: region %q must be 1-64 of [A-Za-z0-9_.-]: %w", cmd, name, ErrBadRequest)
	}
	return nil
}
