package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"
	"time"

	"hostd/dataplane"
	"hostd/hostd/api"
	"hostd/hostd/connector"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/vm"
	"hostd/xen"
)

// Error is a non-2xx answer from hostd.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("hostd: %s (HTTP %d %s)", e.Message, e.Status, e.Code)
}

// IsStatus reports whether err is an API error with that HTTP status.
func IsStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == status
}

// Client talks to one hostd socket.
type Client struct {
	hc *http.Client
}

// New returns a client for the unix socket at path.
func New(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 4,
	}
	return &Client{hc: &http.Client{Transport: tr}}
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// Do sends a request with an optional body (a value to encode as JSON, or
// an io.Reader sent as is) and decodes a JSON answer
// into out (if non-nil). It is exported for requests the typed methods do
// not cover yet.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// send returns a 2xx response or an *Error.
func (c *Client) send(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if r, ok := body.(io.Reader); ok {
		rd = r // sent as is: lets tests send malformed JSON
	} else if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("%s %s: encode body: %w", method, path, err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://hostd"+path, rd)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if errors.Is(err, syscall.EACCES) {
		return nil, fmt.Errorf("%s %s: %w (the socket is for root and hostd's group, \"hostd\" unless api.group says otherwise: usermod -aG hostd USER, then log in again)", method, path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w (is hostd running?)", method, path, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var ae api.Error
	if json.Unmarshal(data, &ae) != nil || ae.Message == "" {
		ae = api.Error{Code: "unknown", Message: string(data)}
	}
	return nil, &Error{Status: resp.StatusCode, Code: ae.Code, Message: ae.Message}
}

// Host returns GET /v1/host.
func (c *Client) Host(ctx context.Context) (api.HostInfo, error) {
	var h api.HostInfo
	return h, c.Do(ctx, http.MethodGet, "/v1/host", nil, &h)
}

// CreateVM creates (and by default starts) a VM.
func (c *Client) CreateVM(ctx context.Context, r vm.Request) (vm.VM, error) {
	var v vm.VM
	return v, c.Do(ctx, http.MethodPost, "/v1/vms", r, &v)
}

// ListVMs lists all VMs.
func (c *Client) ListVMs(ctx context.Context) ([]vm.VM, error) {
	var v []vm.VM
	return v, c.Do(ctx, http.MethodGet, "/v1/vms", nil, &v)
}

// VM returns one VM.
func (c *Client) VM(ctx context.Context, name string) (vm.VM, error) {
	var v vm.VM
	return v, c.Do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name), nil, &v)
}

// DeleteVM deletes a VM.
func (c *Client) DeleteVM(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(name), nil, nil)
}

// StartVM boots a stopped VM.
func (c *Client) StartVM(ctx context.Context, name string) (vm.VM, error) {
	var v vm.VM
	return v, c.Do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/start", nil, &v)
}

// DestroyVM powers a VM off at once.
func (c *Client) DestroyVM(ctx context.Context, name string) (vm.VM, error) {
	var v vm.VM
	return v, c.Do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/destroy", nil, &v)
}

// ShutdownVM starts an ACPI shutdown job (timeout 0: the daemon's default).
func (c *Client) ShutdownVM(ctx context.Context, name string, timeout time.Duration) (jobs.Job, error) {
	var j jobs.Job
	return j, c.Do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/shutdown",
		api.ShutdownRequest{TimeoutSeconds: timeout.Seconds()}, &j)
}

// Console returns the last lines of a VM's serial console.
func (c *Client) Console(ctx context.Context, name string, lines int) ([]byte, error) {
	resp, err := c.send(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name)+"/console?lines="+strconv.Itoa(lines), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// Stats samples a VM's counters.
func (c *Client) Stats(ctx context.Context, name string) (xen.DomainStats, error) {
	var s xen.DomainStats
	return s, c.Do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name)+"/stats", nil, &s)
}

// Connectors lists the connectors with an endpoint on this host.
func (c *Client) Connectors(ctx context.Context) ([]connector.Record, error) {
	var cs []connector.Record
	return cs, c.Do(ctx, http.MethodGet, "/v1/connectors", nil, &cs)
}

// CreateConnector configures this host's endpoints of a connector.
func (c *Client) CreateConnector(ctx context.Context, s connector.Spec) (connector.Record, error) {
	var r connector.Record
	return r, c.Do(ctx, http.MethodPost, "/v1/connectors", s, &r)
}

// Connector returns one connector.
func (c *Client) Connector(ctx context.Context, id uint32) (connector.Record, error) {
	var r connector.Record
	return r, c.Do(ctx, http.MethodGet, fmt.Sprintf("/v1/connectors/%d", id), nil, &r)
}

// RetargetConnector replaces a connector's endpoints.
func (c *Client) RetargetConnector(ctx context.Context, s connector.Spec) (connector.Record, error) {
	var r connector.Record
	return r, c.Do(ctx, http.MethodPut, fmt.Sprintf("/v1/connectors/%d", s.ID), s, &r)
}

// DeleteConnector removes this host's endpoints of a connector.
func (c *Client) DeleteConnector(ctx context.Context, id uint32) error {
	return c.Do(ctx, http.MethodDelete, fmt.Sprintf("/v1/connectors/%d", id), nil, nil)
}

// ConnectorStats returns a connector's counters on this host.
func (c *Client) ConnectorStats(ctx context.Context, id uint32) (dataplane.Stats, error) {
	var st dataplane.Stats
	return st, c.Do(ctx, http.MethodGet, fmt.Sprintf("/v1/connectors/%d/stats", id), nil, &st)
}

// Jobs lists all jobs.
func (c *Client) Jobs(ctx context.Context) ([]jobs.Job, error) {
	var j []jobs.Job
	return j, c.Do(ctx, http.MethodGet, "/v1/jobs", nil, &j)
}

// Job returns one job.
func (c *Client) Job(ctx context.Context, id string) (jobs.Job, error) {
	var j jobs.Job
	return j, c.Do(ctx, http.MethodGet, "/v1/jobs/"+url.PathEscape(id), nil, &j)
}

// WaitJob polls a job until it is no longer running or ctx ends.
func (c *Client) WaitJob(ctx context.Context, id string) (jobs.Job, error) {
	return poll(ctx, "wait for job "+id,
		func() (jobs.Job, error) { return c.Job(ctx, id) },
		func(j jobs.Job) bool { return j.State != jobs.Running })
}

// WaitReady polls a VM until its agent has announced itself after the last
// start, or ctx ends.
func (c *Client) WaitReady(ctx context.Context, name string) (vm.VM, error) {
	return poll(ctx, "wait for VM "+name+" to be ready",
		func() (vm.VM, error) { return c.VM(ctx, name) },
		func(v vm.VM) bool { return v.Ready != nil })
}

// poll calls get every 50 ms until done accepts its answer, get fails, or
// ctx ends; it returns the last answer in every case.
func poll[T any](ctx context.Context, what string, get func() (T, error), done func(T) bool) (T, error) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		v, err := get()
		if err != nil || done(v) {
			return v, err
		}
		select {
		case <-ctx.Done():
			return v, fmt.Errorf("%s: %w", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// Event is an event as received: Data stays raw for the caller to decode.
type Event struct {
	events.Event
	Data json.RawMessage `json:"data,omitempty"`
}

// Events streams events until ctx ends or the daemon closes the stream; the
// channel is closed then. The stream is open when Events returns.
func (c *Client) Events(ctx context.Context) (<-chan Event, error) {
	resp, err := c.send(ctx, http.MethodGet, "/v1/events", nil)
	if err != nil {
		return nil, err
	}
	ch := make(chan Event, 64)
	go func() {
		defer close(ch)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			var e Event
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			select {
			case ch <- e:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

// Metrics returns the Prometheus text exposition.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	resp, err := c.send(ctx, http.MethodGet, "/metrics", nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
