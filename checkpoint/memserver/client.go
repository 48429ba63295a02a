package memserver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// ErrNotRunning: no memory server answers on the control socket (it was
// never started, has exited, or died).
var ErrNotRunning = errors.New("memory server is not running")

// notRunning says which server is not running, and why the client thinks so.
type notRunning struct {
	msg string
	err error
}

func (e *notRunning) Error() string   { return e.msg }
func (e *notRunning) Unwrap() []error { return []error{ErrNotRunning, e.err} }

// Error is an error a memory server answered with: its HTTP status (4xx:
// the request was wrong or does not fit the server's state; 5xx: the
// server or its backup failed) and its message.
type Error struct {
	StatusCode int
	Message    string
}

func (e *Error) Error() string { return e.Message }

// Client speaks to one memory server over its control socket. It
// implements Control (see api.go) and is safe for concurrent use.
type Client struct {
	socket string
	hc     *http.Client

	mu sync.Mutex
	vm string // for messages; learned from the first Status, or given by Spawn
}

// New returns a client for the memory server on socket. It does not
// connect; Attach checks that one answers.
func New(socket string) *Client {
	return &Client{
		socket: socket,
		hc: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
			MaxIdleConns:    2,
			IdleConnTimeout: 30 * time.Second,
		}},
	}
}

// Attach connects to a running memory server (after a restart of hostd)
// and checks that it answers.
func Attach(ctx context.Context, socket string) (*Client, error) {
	c := New(socket)
	if _, err := c.Status(ctx); err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	return c, nil
}

// Socket is the control socket's path.
func (c *Client) Socket() string { return c.socket }

func (c *Client) name() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.vm == "" {
		return "on " + c.socket
	}
	return "of VM " + c.vm
}

func (c *Client) setVM(vm string) {
	c.mu.Lock()
	c.vm = vm
	c.mu.Unlock()
}

// do sends one request; out, if not nil, receives the JSON answer.
func (c *Client) do(ctx context.Context, op, method, path, ctype string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://memserver"+path, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("memory server %s: %s: %w", c.name(), op, err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("memory server %s: %s: %w", c.name(), op, ctx.Err())
		}
		// Refused, missing socket, or a connection the server dropped
		// by dying: in each case nothing serves the VM's memory now.
		return &notRunning{msg: fmt.Sprintf("memory server %s is not running (%s on socket %s: %v)", c.name(), op, c.socket, err), err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return fmt.Errorf("memory server %s: %s: read answer: %w", c.name(), op, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb errorBody
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
		}
		return &Error{StatusCode: resp.StatusCode, Message: eb.Error}
	}
	if raw, ok := out.(*rawAnswer); ok {
		*raw = b
		return nil
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("memory server %s: %s: decode answer: %w", c.name(), op, err)
		}
	}
	return nil
}

func (c *Client) postJSON(ctx context.Context, op, path string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("memory server %s: %s: %w", c.name(), op, err)
		}
	}
	return c.do(ctx, op, http.MethodPost, path, "application/json", body, out)
}

// Status returns the server's snapshot.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	if err := c.do(ctx, "status", http.MethodGet, pathStatus, "", nil, &st); err != nil {
		return Status{}, err
	}
	c.setVM(st.VM)
	return st, nil
}

// Protect starts streaming to a backup. It returns once connected; the
// first copy runs on (Status.State is copying, then protected).
func (c *Client) Protect(ctx context.Context, p Protection) error {
	return c.postJSON(ctx, "protect", pathProtect, p, nil)
}

// Unprotect closes the stream; the RAM stays served.
func (c *Client) Unprotect(ctx context.Context) error {
	return c.postJSON(ctx, "unprotect", pathUnprotect, nil, nil)
}

// SetRate changes the VM's share of backup bandwidth (bytes/s, 0 =
// unlimited).
func (c *Client) SetRate(ctx context.Context, bytesPerSec float64) error {
	return c.postJSON(ctx, "set rate", pathRate, rateBody{Rate: bytesPerSec}, nil)
}

// Notice reports a termination notice: the cap tightens towards deadline.
func (c *Client) Notice(ctx context.Context, deadline time.Time) error {
	return c.postJSON(ctx, "termination notice", pathNotice, noticeBody{Deadline: deadline}, nil)
}

// Sync flushes every dirty page to the backup (waiting for the first copy
// if it is still running).
func (c *Client) Sync(ctx context.Context) (SyncReport, error) {
	var r SyncReport
	err := c.postJSON(ctx, "sync", pathSync, nil, &r)
	return r, err
}

// Commit sends the device state and makes a restore point; durable on
// return. Call it after Sync, with the VM paused.
func (c *Client) Commit(ctx context.Context, state []byte) (CommitReport, error) {
	var r CommitReport
	err := c.do(ctx, "commit", http.MethodPost, pathCommit, "application/octet-stream", state, &r)
	return r, err
}

// Shutdown stops streaming, unmounts and ends the server, and waits until
// it no longer answers. Call it only once QEMU has let go of the file.
func (c *Client) Shutdown(ctx context.Context) error {
	if err := c.postJSON(ctx, "shutdown", pathShutdown, nil, nil); err != nil {
		return err
	}
	c.hc.CloseIdleConnections()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		conn, err := net.DialTimeout("unix", c.socket, time.Second)
		if err != nil {
			return nil
		}
		conn.Close()
		select {
		case <-ctx.Done():
			return fmt.Errorf("memory server %s: shutdown: still answering: %w", c.name(), ctx.Err())
		case <-t.C:
		}
	}
}

var _ Control = (*Client)(nil)
