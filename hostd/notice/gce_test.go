package notice

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func newTestGCE(t *testing.T, f *fakeGCE) (*GCE, *logBuffer) {
	log, buf := testLogger(t)
	return &GCE{Endpoint: Endpoint{BaseURL: f.srv.URL, Interval: testInterval, Log: log, RequestTimeout: 200 * time.Millisecond}, WaitTimeout: time.Second}, buf
}

func TestFakeGCERequiresFlavor(t *testing.T) {
	f := newFakeGCE(t)
	resp, err := http.Get(f.srv.URL + gcePreemptedPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("GET without Metadata-Flavor: status %d, want 403", resp.StatusCode)
	}
}

func TestGCENoNotice(t *testing.T) {
	f := newFakeGCE(t)
	w, _ := newTestGCE(t, f)
	c, stop := runWatcher(t, w.Run)
	// Two long-polls: the first one timed out and the watcher went on.
	waitFor(t, "2 long-polls", func() bool { _, l, _ := f.snapshot(); return l >= 2 })
	stop()
	if n := c.get(); len(n) != 0 {
		t.Fatalf("delivered %v while not preempted", n)
	}
}

// The preemption arrives while a long-poll is held: the long-poll carries
// it, and it is delivered once with GCE's 30 s deadline.
func TestGCEPreemptedDuringLongPoll(t *testing.T) {
	f := newFakeGCE(t)
	w, _ := newTestGCE(t, f)
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "a held long-poll", func() bool { _, _, waiting := f.snapshot(); return waiting > 0 })
	posted := time.Now()
	f.set("TRUE")
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	t.Logf("notice delivered %v after preemption", time.Since(posted))
	r0, _, _ := f.snapshot()
	waitFor(t, "2 more requests", func() bool { r, _, _ := f.snapshot(); return r >= r0+2 })
	stop()

	f.mu.Lock()
	viaLongPoll := f.servedTrueToLongPoll
	f.mu.Unlock()
	if !viaLongPoll {
		t.Errorf("the preemption did not come through a long-poll")
	}
	got := c.get()
	if len(got) != 1 {
		t.Fatalf("delivered %d notices, want exactly 1: %v", len(got), got)
	}
	n := got[0]
	if n.Provider != GCEProvider || n.Action != "preempt" || !n.Deadline.Equal(n.Received.Add(GCEWarning)) {
		t.Fatalf("notice %+v, want gce preempt due 30 s after it was received", n)
	}
}

// hostd restarted during the warning: the flag is already TRUE, which a
// long-poll without a known ETag would never report.
func TestGCEPreemptedBeforeStart(t *testing.T) {
	f := newFakeGCE(t)
	f.set("TRUE")
	w, _ := newTestGCE(t, f)
	c, _ := runWatcher(t, w.Run)
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
}

// A server without ETags (one that ignores wait_for_change) is polled
// once per interval, not in a loop, and the preemption is still seen.
func TestGCEFallsBackToPolling(t *testing.T) {
	f := newFakeGCE(t)
	f.noETag = true
	w, logs := newTestGCE(t, f)
	start := time.Now()
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "5 requests", func() bool { r, _, _ := f.snapshot(); return r >= 5 })
	f.set("TRUE")
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	stop()
	elapsed := time.Since(start)
	requests, _, _ := f.snapshot()
	t.Logf("%d plain polls in %v", requests, elapsed)
	if limit := int(elapsed/testInterval) + 2; requests > limit {
		t.Fatalf("%d requests in %v: more than one per interval (%d)", requests, elapsed, limit)
	}
	if logs.count("polling preempted every interval") != 1 {
		t.Errorf("the fallback to polling was not logged once")
	}
}

func TestGCEPlainPolling(t *testing.T) {
	f := newFakeGCE(t)
	w, _ := newTestGCE(t, f)
	w.PlainPolling = true
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "5 requests", func() bool { r, _, _ := f.snapshot(); return r >= 5 })
	f.set("TRUE")
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	stop()
	if _, l, _ := f.snapshot(); l != 0 {
		t.Fatalf("%d long-polls with PlainPolling set", l)
	}
}

// Failures (including of a long-poll) are retried and a later preemption
// is delivered.
func TestGCEErrorsThenNotice(t *testing.T) {
	f := newFakeGCE(t)
	w, logs := newTestGCE(t, f)
	c, _ := runWatcher(t, w.Run)
	waitFor(t, "a held long-poll", func() bool { _, _, waiting := f.snapshot(); return waiting > 0 })
	f.mu.Lock()
	f.failNext = 3
	f.mu.Unlock()
	// The change ends the held long-poll with an answer; then three
	// failures.
	f.set("FALSE")
	waitFor(t, "the failures", func() bool {
		r, _, _ := f.snapshot()
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.failNext == 0 && r > 0
	})
	f.set("TRUE")
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	if logs.count("metadata poll failed") == 0 {
		t.Errorf("failures not logged")
	}
}

// Answers that are not a GCE metadata server's are logged, never delivered.
func TestGCEMalformed(t *testing.T) {
	f := newFakeGCE(t)
	w, logs := newTestGCE(t, f)
	w.PlainPolling = true
	c, stop := runWatcher(t, w.Run)
	for _, v := range []string{"true", "TRUE\x00", "YES", "TRUE TRUE", strings.Repeat("T", MaxBody+1)} {
		f.set(v)
		r0, _, _ := f.snapshot()
		waitFor(t, "3 polls", func() bool { r, _, _ := f.snapshot(); return r >= r0+3 })
	}
	f.mu.Lock()
	f.noFlavor = true
	f.mu.Unlock()
	f.set("TRUE")
	r0, _, _ := f.snapshot()
	waitFor(t, "3 polls", func() bool { r, _, _ := f.snapshot(); return r >= r0+3 })
	stop()
	if got := c.get(); len(got) != 0 {
		t.Fatalf("delivered %v from malformed answers", got)
	}
	if logs.count("metadata poll failed") == 0 {
		t.Errorf("malformed answers not logged")
	}
}
