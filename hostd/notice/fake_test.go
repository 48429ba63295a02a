package notice

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// This file holds fake metadata servers on loopback that speak the three
// providers' protocols, including the parts a careless client gets wrong
// (IMDSv2 tokens, GCE's Metadata-Flavor, Azure's Metadata header), and the
// helpers the tests share.

// testInterval is the polling interval of every test watcher.
const testInterval = 20 * time.Millisecond

// waitLimit bounds every wait in the tests; only a hung watcher reaches it.
const waitLimit = 20 * time.Second

// fakeEC2 is IMDSv2: tokens from PUT /latest/api/token, 401 without a
// valid one, spot/instance-action 404 until a notice is set.
type fakeEC2 struct {
	srv *httptest.Server

	mu       sync.Mutex
	tokens   map[string]bool
	issued   int
	status   int    // of instance-action: 404 until set
	body     []byte // of instance-action
	failNext int    // answer 500 to that many GETs
	hangNext int    // hold that many GETs until the client gives up
	gets     int    // instance-action requests answered with a valid token
	rejected int    // requests answered 401
}

func newFakeEC2(t *testing.T) *fakeEC2 {
	f := &fakeEC2{tokens: map[string]bool{}, status: http.StatusNotFound}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeEC2) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPut && r.URL.Path == ec2TokenPath:
		ttl, err := strconv.Atoi(r.Header.Get(ec2TokenTTLHeader))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "bad TTL", http.StatusBadRequest)
			return
		}
		f.mu.Lock()
		f.issued++
		tok := fmt.Sprintf("token-%d-AAAA", f.issued)
		f.tokens[tok] = true
		f.mu.Unlock()
		w.Header().Set(ec2TokenTTLHeader, strconv.Itoa(ttl))
		fmt.Fprint(w, tok)
	case r.Method == http.MethodGet && r.URL.Path == ec2ActionPath:
		f.mu.Lock()
		if !f.tokens[r.Header.Get(ec2TokenHeader)] {
			f.rejected++
			f.mu.Unlock()
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		f.gets++
		fail, hang := f.failNext > 0, f.failNext == 0 && f.hangNext > 0
		if fail {
			f.failNext--
		} else if hang {
			f.hangNext--
		}
		status, body := f.status, f.body
		f.mu.Unlock()
		switch {
		case fail:
			http.Error(w, "internal error", http.StatusInternalServerError)
		case hang:
			<-r.Context().Done()
		case status == http.StatusNotFound:
			http.NotFound(w, r)
		default:
			w.WriteHeader(status)
			w.Write(body)
		}
	default:
		http.NotFound(w, r)
	}
}

// setAction makes instance-action answer 200 with body.
func (f *fakeEC2) setAction(body string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.status, f.body = http.StatusOK, []byte(body)
}

// revokeTokens forgets every token, as IMDS does when it restarts.
func (f *fakeEC2) revokeTokens() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.tokens)
}

func (f *fakeEC2) counts() (gets, issued, rejected int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gets, f.issued, f.rejected
}

// fakeGCE serves instance/preempted with ETags and wait_for_change.
type fakeGCE struct {
	srv *httptest.Server

	mu        sync.Mutex
	value     string
	etag      int
	changed   chan struct{} // closed and replaced on every change
	noETag    bool          // an old server: no ETag, wait_for_change ignored
	noFlavor  bool          // answer without Metadata-Flavor
	failNext  int
	requests  int
	longPolls int // long-polls received
	waiting   int // long-polls being held now
	// servedTrueToLongPoll: a long-poll carried the TRUE value.
	servedTrueToLongPoll bool
}

func newFakeGCE(t *testing.T) *fakeGCE {
	f := &fakeGCE{value: "FALSE", etag: 1, changed: make(chan struct{})}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeGCE) tag() string { return fmt.Sprintf("etag%08x", f.etag) }

func (f *fakeGCE) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(gceFlavorHeader) != gceFlavor {
		http.Error(w, "Missing Metadata-Flavor:Google header.", http.StatusForbidden)
		return
	}
	if r.Method != http.MethodGet || r.URL.Path != gcePreemptedPath {
		http.NotFound(w, r)
		return
	}
	q := r.URL.Query()
	f.mu.Lock()
	f.requests++
	if f.failNext > 0 {
		f.failNext--
		f.mu.Unlock()
		http.Error(w, "backend error", http.StatusServiceUnavailable)
		return
	}
	long := q.Get("wait_for_change") == "true" && !f.noETag
	if long {
		f.longPolls++
		timeout := time.Duration(60) * time.Second
		if s := q.Get("timeout_sec"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				f.mu.Unlock()
				http.Error(w, "bad timeout_sec", http.StatusBadRequest)
				return
			}
			timeout = time.Duration(n) * time.Second
		}
		if q.Get("last_etag") == f.tag() {
			ch := f.changed
			f.waiting++
			f.mu.Unlock()
			t := time.NewTimer(timeout)
			select {
			case <-ch:
			case <-t.C:
			case <-r.Context().Done():
			}
			t.Stop()
			f.mu.Lock()
			f.waiting--
		}
	}
	value, tag := f.value, f.tag()
	if long && value == "TRUE" {
		f.servedTrueToLongPoll = true
	}
	noETag, noFlavor := f.noETag, f.noFlavor
	f.mu.Unlock()
	if !noFlavor {
		w.Header().Set(gceFlavorHeader, gceFlavor)
	}
	if !noETag {
		w.Header().Set("ETag", tag)
	}
	fmt.Fprint(w, value)
}

func (f *fakeGCE) set(value string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.value = value
	f.etag++
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeGCE) snapshot() (requests, longPolls, waiting int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests, f.longPolls, f.waiting
}

// fakeAzure serves Scheduled Events, their acknowledgement and the VM name.
type fakeAzure struct {
	srv *httptest.Server

	mu       sync.Mutex
	doc      []byte
	name     string
	failNext int
	hangNext int
	requests int
	acks     []string
}

func newFakeAzure(t *testing.T, name string) *fakeAzure {
	f := &fakeAzure{doc: []byte(`{"DocumentIncarnation":0,"Events":[]}`), name: name}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAzure) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(azureHeader) != "true" {
		http.Error(w, `{"error":"Bad request. Required metadata header not specified"}`, http.StatusBadRequest)
		return
	}
	switch {
	case r.URL.Path == "/metadata/scheduledevents" && r.URL.Query().Get("api-version") == "2020-07-01":
	case r.Method == http.MethodGet && r.URL.Path == "/metadata/instance/compute/name" && r.URL.Query().Get("format") == "text":
		f.mu.Lock()
		name := f.name
		f.mu.Unlock()
		fmt.Fprint(w, name)
		return
	default:
		http.NotFound(w, r)
		return
	}
	switch r.Method {
	case http.MethodGet:
		f.mu.Lock()
		f.requests++
		fail, hang := f.failNext > 0, f.failNext == 0 && f.hangNext > 0
		if fail {
			f.failNext--
		} else if hang {
			f.hangNext--
		}
		doc := f.doc
		f.mu.Unlock()
		switch {
		case fail:
			http.Error(w, "internal error", http.StatusInternalServerError)
		case hang:
			<-r.Context().Done()
		default:
			w.Header().Set("Content-Type", "application/json")
			w.Write(doc)
		}
	case http.MethodPost:
		var req azureStartRequests
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(req.StartRequests) == 0 {
			http.Error(w, "bad StartRequests", http.StatusBadRequest)
			return
		}
		f.mu.Lock()
		for _, s := range req.StartRequests {
			f.acks = append(f.acks, s.EventID)
		}
		f.mu.Unlock()
	default:
		http.Error(w, "method", http.StatusMethodNotAllowed)
	}
}

func (f *fakeAzure) setDoc(doc string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.doc = []byte(doc)
}

func (f *fakeAzure) snapshot() (requests int, acks []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests, slices.Clone(f.acks)
}

// collector records delivered notices.
type collector struct {
	mu      sync.Mutex
	notices []Notice
}

func (c *collector) add(n Notice) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.notices = append(c.notices, n)
}

func (c *collector) get() []Notice {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Notice(nil), c.notices...)
}

// logBuffer collects a watcher's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuffer) count(s string) int { return strings.Count(b.String(), s) }

// testLogger returns a logger into a buffer, printed if the test fails.
func testLogger(t *testing.T) (*slog.Logger, *logBuffer) {
	b := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("watcher log:\n%s", b.String())
		}
	})
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

// runWatcher starts run in a goroutine; the returned stop cancels it and
// waits (bounded) for it to return, and is also registered as cleanup.
func runWatcher(t *testing.T, run func(context.Context, func(Notice)) error) (*collector, func()) {
	t.Helper()
	c := &collector{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, c.add) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(waitLimit):
				t.Errorf("Run did not return within %v of its context ending", waitLimit)
			}
		})
	}
	t.Cleanup(stop)
	return c, stop
}

// waitFor polls cond until it holds or waitLimit passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %v waiting for %s", waitLimit, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
