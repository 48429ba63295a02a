package notice

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// Endpoint is what every watcher needs to reach its metadata server. The
// zero value of each field means its default.
type Endpoint struct {
	// BaseURL of the metadata server; DefaultBaseURL if empty.
	BaseURL string
	// Interval between polls; the provider's documented cadence if zero.
	Interval time.Duration
	// Client makes the requests; NewClient() if nil.
	Client *http.Client
	// Log receives failures (at most about once a minute while they last)
	// and notices; slog.Default() if nil.
	Log *slog.Logger
	// RequestTimeout bounds one request (a GCE long-poll gets its wait on
	// top); DefaultRequestTimeout if zero.
	RequestTimeout time.Duration
	// MaxBackoff caps the wait between polls while they fail; twice the
	// interval if zero or below the interval, which keeps the watcher well
	// inside the warning once the metadata server answers again.
	MaxBackoff time.Duration
}

// DefaultRequestTimeout bounds a metadata request: the server is on the
// local link and answers in milliseconds when it answers at all.
const DefaultRequestTimeout = 2 * time.Second

// errorLogEvery is how often a failure that lasts is logged again.
const errorLogEvery = time.Minute

// NewClient returns the client watchers use by default: short dial and
// header timeouts, no proxy (the metadata server is on the local link and
// must not be reached through HTTP_PROXY), no redirects (a metadata server
// does not redirect; following one could send the instance's token away).
func NewClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			Proxy:                 nil,
			DialContext:           (&net.Dialer{Timeout: time.Second}).DialContext,
			MaxIdleConns:          2,
			IdleConnTimeout:       30 * time.Second,
			ExpectContinueTimeout: time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// endpoint is an Endpoint with its defaults filled in and checked.
type endpoint struct {
	base        string
	interval    time.Duration
	maxBackoff  time.Duration
	reqTimeout  time.Duration
	client      *http.Client
	log         *slog.Logger
	provider    Provider
	ownedClient bool
}

func (e Endpoint) resolve(p Provider, cadence, warning time.Duration) (endpoint, error) {
	base, err := baseURL(e.BaseURL)
	if err != nil {
		return endpoint{}, fmt.Errorf("%s watcher: base URL: %w", p, err)
	}
	if err := checkInterval(string(p)+" watcher interval", e.Interval, warning); err != nil {
		return endpoint{}, err
	}
	r := endpoint{base: base, interval: e.Interval, maxBackoff: e.MaxBackoff, reqTimeout: e.RequestTimeout, client: e.Client, log: e.Log, provider: p}
	if r.interval == 0 {
		r.interval = cadence
	}
	if r.maxBackoff < r.interval {
		r.maxBackoff = 2 * r.interval
	}
	if r.reqTimeout <= 0 {
		r.reqTimeout = DefaultRequestTimeout
	}
	if r.client == nil {
		r.client = NewClient()
		r.ownedClient = true
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	r.log = r.log.With("component", "notice", "provider", string(p))
	return r, nil
}

// poll is one look at the metadata server: the notices it shows now, and
// how long to wait before the next look (zero: the interval).
type poll func(ctx context.Context) (notices []Notice, next time.Duration, err error)

// run polls until ctx ends, delivering each notice ID once. After a
// delivery, delivered (if not nil) is told, for Azure's acknowledgement.
// Every path through the loop waits at least the interval, or what a poll
// asked for, so a server that fails instantly cannot make it spin.
func (e endpoint) run(ctx context.Context, look poll, onNotice func(Notice), delivered func(context.Context, Notice)) {
	if e.ownedClient {
		defer e.client.CloseIdleConnections()
	}
	e.log.Debug("watching for termination notices", "base_url", e.base, "interval", e.interval)
	seen := map[string]bool{}
	rep := errorReport{log: e.log}
	backoff := e.interval
	for {
		notices, next, err := look(ctx)
		wait := e.interval
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			rep.failed(err)
			wait = backoff
			backoff = min(2*backoff, e.maxBackoff)
		default:
			rep.ok()
			backoff = e.interval
			if next > 0 {
				wait = next
			}
		}
		for _, n := range notices {
			if seen[n.ID] {
				continue
			}
			seen[n.ID] = true
			e.log.Warn("termination notice", "id", n.ID, "action", n.Action, "deadline", n.Deadline, "in", time.Until(n.Deadline).Round(time.Millisecond), "detail", n.Detail)
			onNotice(n)
			if delivered != nil {
				delivered(ctx, n)
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// errorReport logs a run of failures once when it starts, then at most once
// per errorLogEvery, and once more when it ends: a metadata server that is
// down for an hour must not fill the journal at one line a second.
type errorReport struct {
	log        *slog.Logger
	failures   int // consecutive
	suppressed int
	lastLog    time.Time
}

func (r *errorReport) failed(err error) {
	r.failures++
	if r.failures > 1 && time.Since(r.lastLog) < errorLogEvery {
		r.suppressed++
		return
	}
	r.log.Warn("metadata poll failed; retrying (check the provider setting in [notice] if this machine is not on that cloud)",
		"err", err, "consecutive_failures", r.failures, "suppressed_since_last_log", r.suppressed)
	r.lastLog = time.Now()
	r.suppressed = 0
}

func (r *errorReport) ok() {
	if r.failures > 0 {
		r.log.Info("metadata poll works again", "after_failures", r.failures)
	}
	r.failures, r.suppressed = 0, 0
}

// errBodyTooLarge is returned for a response larger than MaxBody.
var errBodyTooLarge = fmt.Errorf("response body larger than %d bytes", MaxBody)

// answer is a metadata server's response, its body already read.
type answer struct {
	status int
	header http.Header
	body   []byte
}

// call sends one request to the metadata server, bounded by the request
// timeout plus extra (a long-poll's wait), and reads at most MaxBody bytes
// of the answer. Errors name the method and path.
func (e endpoint) call(ctx context.Context, method, path string, header map[string]string, body []byte, extra time.Duration) (answer, error) {
	ctx, cancel := context.WithTimeout(ctx, e.reqTimeout+extra)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, e.base+path, rd)
	if err != nil {
		return answer{}, fmt.Errorf("%s %s: %w", method, path, err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		return answer{}, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxBody+1))
	if err != nil {
		return answer{}, fmt.Errorf("%s %s: read response: %w", method, path, err)
	}
	if len(b) > MaxBody {
		return answer{}, fmt.Errorf("%s %s: %w", method, path, errBodyTooLarge)
	}
	return answer{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

// unexpected describes an answer with a status the protocol does not have
// here, with the start of its body for whoever reads the log.
func unexpected(method, path string, a answer) error {
	const show = 200
	b := a.body
	if len(b) > show {
		b = b[:show]
	}
	return fmt.Errorf("%s %s: unexpected status %d %s: %q", method, path, a.status, http.StatusText(a.status), b)
}

// decodeStrict decodes exactly one JSON value from b into v: trailing data
// after it is an error, so a truncated or concatenated answer is not taken
// for a good one.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode JSON: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("decode JSON: trailing data after the value")
	}
	return nil
}
