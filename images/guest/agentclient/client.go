package agentclient

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"hostd/images/guest/agentapi"
)

// maxStaleResponses bounds how many unrelated responses a call skips. They
// come from requests whose caller gave up (context expired) before the
// agent answered; more than this means the stream is out of step.
const maxStaleResponses = 64

// AgentError is a well-formed error response from the agent.
type AgentError struct {
	Cmd     string
	Message string
}

func (e *AgentError) Error() string { return "agent " + e.Cmd + ": " + e.Message }

// Client talks to one guest agent. Calls are serialised: the protocol
// answers in order, one response per request.
type Client struct {
	mu     sync.Mutex
	conn   net.Conn
	r      *bufio.Reader
	nextID uint64
}

// Dial connects to the unix socket of the VM's agent channel. QEMU creates
// the socket when it starts, so Dial retries while the socket does not
// exist yet or refuses, until ctx ends.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", socketPath)
		if err == nil {
			return &Client{conn: conn, r: bufio.NewReaderSize(conn, agentapi.MaxLineBytes)}, nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("dial agent %s: %w", socketPath, err)
		}
		t := time.NewTimer(20 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("dial agent %s: %w (last error: %v)", socketPath, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// Close closes the connection; the agent keeps running.
func (c *Client) Close() error { return c.conn.Close() }

// Call sends cmd with args (nil for none) and decodes the result into
// result (nil to ignore it). An agent-side failure is an *AgentError.
func (c *Client) Call(ctx context.Context, cmd string, args, result any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	req := agentapi.Request{ID: c.nextID, Cmd: cmd}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("agent %s: encode args: %w", cmd, err)
		}
		req.Args = raw
	}
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("agent %s: encode request: %w", cmd, err)
	}
	resp, err := c.roundTrip(ctx, line, req.ID)
	if err != nil {
		return fmt.Errorf("agent %s: %w", cmd, err)
	}
	if !resp.OK {
		return &AgentError{Cmd: cmd, Message: resp.Error}
	}
	if result != nil {
		if err := json.Unmarshal(resp.Result, result); err != nil {
			return fmt.Errorf("agent %s: decode result: %w", cmd, err)
		}
	}
	return nil
}

// RoundTripRaw sends one line exactly as given (a newline is appended) and
// returns the next response, whatever its id. It exists to test how the
// agent treats malformed requests.
func (c *Client) RoundTripRaw(ctx context.Context, line []byte) (agentapi.Response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(ctx, line, 0)
	if err != nil {
		return resp, fmt.Errorf("agent raw request: %w", err)
	}
	return resp, nil
}

// roundTrip writes line and reads responses until the one with id
// (any response when id is 0). ctx bounds both directions through the
// connection deadline.
func (c *Client) roundTrip(ctx context.Context, line []byte, id uint64) (agentapi.Response, error) {
	var resp agentapi.Response
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	} else {
		_ = c.conn.SetDeadline(time.Time{})
	}
	// A cancelled (not timed-out) ctx must unblock the read too.
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := c.conn.Write(append(line, '\n')); err != nil {
		return resp, ctxErr(ctx, fmt.Errorf("write: %w", err))
	}
	for range maxStaleResponses {
		b, err := c.r.ReadBytes('\n')
		if err != nil {
			return resp, ctxErr(ctx, fmt.Errorf("read: %w", err))
		}
		resp = agentapi.Response{}
		if err := json.Unmarshal(b, &resp); err != nil {
			return resp, fmt.Errorf("decode response %q: %w", b, err)
		}
		if id == 0 || resp.ID == id {
			return resp, nil
		}
	}
	return resp, fmt.Errorf("no response with id %d among %d responses", id, maxStaleResponses)
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ctx.Err(), err)
	}
	return err
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) (agentapi.PingResult, error) {
	var r agentapi.PingResult
	return r, c.Call(ctx, agentapi.CmdPing, nil, &r)
}

// Dirty starts a workload writing the seeded pattern over a region.
func (c *Client) Dirty(ctx context.Context, args agentapi.DirtyArgs) (agentapi.WorkloadStatus, error) {
	var r agentapi.WorkloadStatus
	return r, c.Call(ctx, agentapi.CmdDirty, args, &r)
}

// Stop stops a region's writer after its current chunk; the memory stays.
func (c *Client) Stop(ctx context.Context, region string) (agentapi.WorkloadStatus, error) {
	var r agentapi.WorkloadStatus
	return r, c.Call(ctx, agentapi.CmdStop, agentapi.RegionArgs{Region: region}, &r)
}

// Ops reports a region's counters.
func (c *Client) Ops(ctx context.Context, region string) (agentapi.WorkloadStatus, error) {
	var r agentapi.WorkloadStatus
	return r, c.Call(ctx, agentapi.CmdOps, agentapi.RegionArgs{Region: region}, &r)
}

// Checksum hashes a region inside the guest.
func (c *Client) Checksum(ctx context.Context, region string) (agentapi.ChecksumResult, error) {
	var r agentapi.ChecksumResult
	return r, c.Call(ctx, agentapi.CmdChecksum, agentapi.RegionArgs{Region: region}, &r)
}

// VerifyChecksum hashes a region in the guest and compares it with the
// checksum recomputed on the host for the writer position the guest
// reported. It returns the guest's result either way.
func (c *Client) VerifyChecksum(ctx context.Context, region string) (agentapi.ChecksumResult, error) {
	got, err := c.Checksum(ctx, region)
	if err != nil {
		return got, err
	}
	want, err := ExpectedChecksum(got.SizeMiB, got.Seed, got.PassesDone, got.PageInPass)
	if err != nil {
		return got, fmt.Errorf("verify checksum of %s: %w", region, err)
	}
	if got.SHA256 != hex.EncodeToString(want[:]) {
		return got, fmt.Errorf("verify checksum of %s: guest has %s, expected %x for seed %d after %d passes + %d pages",
			region, got.SHA256, want, got.Seed, got.PassesDone, got.PageInPass)
	}
	return got, nil
}

// Expected asks the guest to compute the checksum a region written with
// seed would have at (passesDone, pageInPass), from its own copy of the
// pattern code.
func (c *Client) Expected(ctx context.Context, args agentapi.ExpectedArgs) (agentapi.ExpectedResult, error) {
	var r agentapi.ExpectedResult
	return r, c.Call(ctx, agentapi.CmdExpected, args, &r)
}

// EchoStart starts the guest's TCP+UDP echo server on port.
func (c *Client) EchoStart(ctx context.Context, port uint16) (agentapi.EchoResult, error) {
	var r agentapi.EchoResult
	return r, c.Call(ctx, agentapi.CmdEcho, agentapi.EchoArgs{Action: "start", Port: port}, &r)
}

// EchoStop stops the echo server (a no-op when none runs).
func (c *Client) EchoStop(ctx context.Context) (agentapi.EchoResult, error) {
	var r agentapi.EchoResult
	return r, c.Call(ctx, agentapi.CmdEcho, agentapi.EchoArgs{Action: "stop"}, &r)
}

// Probe has the guest send echo requests to an echo server (typically
// another guest's hostd.echo) and report what came back. The agent answers
// nothing else until the probe ends, after at most
// Count*(IntervalMS+TimeoutMS); ctx must allow for that.
func (c *Client) Probe(ctx context.Context, args agentapi.ProbeArgs) (agentapi.ProbeResult, error) {
	var r agentapi.ProbeResult
	return r, c.Call(ctx, agentapi.CmdProbe, args, &r)
}

// MemInfo returns the guest's /proc/meminfo in KiB.
func (c *Client) MemInfo(ctx context.Context) (agentapi.MemInfoResult, error) {
	var r agentapi.MemInfoResult
	return r, c.Call(ctx, agentapi.CmdMemInfo, nil, &r)
}

// SwapOn formats the disk with that serial as swap and turns it on.
func (c *Client) SwapOn(ctx context.Context, serial string) (agentapi.SwapResult, error) {
	var r agentapi.SwapResult
	err := c.Call(ctx, agentapi.CmdSwapOn, agentapi.SwapArgs{Serial: serial}, &r)
	return r, err
}

// SwapOff turns the swap on the disk with that serial off.
func (c *Client) SwapOff(ctx context.Context, serial string) (agentapi.SwapResult, error) {
	var r agentapi.SwapResult
	err := c.Call(ctx, agentapi.CmdSwapOff, agentapi.SwapArgs{Serial: serial}, &r)
	return r, err
}

// Stats returns uptime, kernel and agent counters.
func (c *Client) Stats(ctx context.Context) (agentapi.StatsResult, error) {
	var r agentapi.StatsResult
	return r, c.Call(ctx, agentapi.CmdStats, nil, &r)
}

// ExpectedChecksum is the SHA-256 a region must have; see agentapi.
func ExpectedChecksum(sizeMiB, seed, passesDone, pageInPass uint64) ([32]byte, error) {
	return agentapi.ExpectedChecksum(sizeMiB, seed, passesDone, pageInPass)
}
