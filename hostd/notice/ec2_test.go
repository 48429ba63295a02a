package notice

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func newTestEC2(t *testing.T, f *fakeEC2) (*EC2, *logBuffer) {
	log, buf := testLogger(t)
	return &EC2{Endpoint: Endpoint{BaseURL: f.srv.URL, Interval: testInterval, Log: log, RequestTimeout: 200 * time.Millisecond}}, buf
}

// The fake must enforce IMDSv2, or the tests below would not show that the
// watcher does.
func TestFakeEC2RequiresToken(t *testing.T) {
	f := newFakeEC2(t)
	resp, err := http.Get(f.srv.URL + ec2ActionPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("GET without token: status %d, want 401", resp.StatusCode)
	}
}

func TestEC2NoNotice(t *testing.T) {
	f := newFakeEC2(t)
	w, _ := newTestEC2(t, f)
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "10 polls", func() bool { g, _, _ := f.counts(); return g >= 10 })
	stop()
	if n := c.get(); len(n) != 0 {
		t.Fatalf("delivered %v with no notice posted", n)
	}
	gets, issued, rejected := f.counts()
	t.Logf("%d polls, %d tokens issued, %d rejected", gets, issued, rejected)
	if issued != 1 || rejected != 0 {
		t.Errorf("issued %d tokens with %d rejections, want one token reused", issued, rejected)
	}
}

func TestEC2NoticeMidRun(t *testing.T) {
	f := newFakeEC2(t)
	w, _ := newTestEC2(t, f)
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "3 polls", func() bool { g, _, _ := f.counts(); return g >= 3 })
	posted := time.Now()
	f.setAction(`{"action":"terminate","time":"2017-09-18T08:22:00Z"}`)
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	t.Logf("notice delivered %v after it was posted", time.Since(posted))
	g0, _, _ := f.counts()
	waitFor(t, "10 more polls", func() bool { g, _, _ := f.counts(); return g >= g0+10 })
	stop()

	got := c.get()
	if len(got) != 1 {
		t.Fatalf("delivered %d notices, want exactly 1: %v", len(got), got)
	}
	n := got[0]
	want := time.Date(2017, 9, 18, 8, 22, 0, 0, time.UTC)
	if n.Provider != EC2Provider || n.Action != "terminate" || !n.Deadline.Equal(want) || n.Received.IsZero() || n.ID == "" {
		t.Fatalf("notice %+v, want ec2 terminate at %v", n, want)
	}
}

// A restarted IMDS forgets its tokens: the watcher gets a new one on the
// 401 and still sees the notice.
func TestEC2TokenRenewedAfter401(t *testing.T) {
	f := newFakeEC2(t)
	w, _ := newTestEC2(t, f)
	c, _ := runWatcher(t, w.Run)
	waitFor(t, "3 polls", func() bool { g, _, _ := f.counts(); return g >= 3 })
	f.revokeTokens()
	f.setAction(`{"action":"stop","time":"2030-01-02T03:04:05Z"}`)
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	_, issued, rejected := f.counts()
	t.Logf("%d tokens issued, %d requests rejected", issued, rejected)
	if issued < 2 || rejected < 1 {
		t.Fatalf("issued %d tokens after %d rejections; the token was not renewed on 401", issued, rejected)
	}
	if n := c.get()[0]; n.Action != "stop" || !n.Deadline.Equal(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Fatalf("notice %+v", n)
	}
}

// Server errors and requests that time out are retried; a notice posted
// after them is still delivered, and the failures are logged but not once
// per poll.
func TestEC2ErrorsThenNotice(t *testing.T) {
	f := newFakeEC2(t)
	f.failNext, f.hangNext = 4, 2
	w, logs := newTestEC2(t, f)
	start := time.Now()
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "the failures to pass", func() bool { g, _, _ := f.counts(); return g >= 8 })
	f.setAction(`{"action":"hibernate","time":"2030-01-02T03:04:05+01:00"}`)
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	stop()
	t.Logf("6 failures and the notice took %v", time.Since(start))
	got := c.get()
	if len(got) != 1 || got[0].Action != "hibernate" || !got[0].Deadline.Equal(time.Date(2030, 1, 2, 2, 4, 5, 0, time.UTC)) {
		t.Fatalf("delivered %v, want one hibernate notice at 02:04:05 UTC", got)
	}
	logged := logs.count("metadata poll failed")
	if logged < 1 || logs.count("metadata poll works again") < 1 {
		t.Fatalf("failures logged %d times, recovery %d times; want both logged", logged, logs.count("metadata poll works again"))
	}
	if time.Since(start) < errorLogEvery && logged != 1 {
		t.Errorf("6 failures within a minute logged %d times, want once", logged)
	}
}

// Malformed answers are logged and never delivered; a good one afterwards
// is.
func TestEC2Malformed(t *testing.T) {
	f := newFakeEC2(t)
	w, logs := newTestEC2(t, f)
	c, stop := runWatcher(t, w.Run)
	bad := []string{
		`{`,
		`{"action":"terminate","time":"yesterday"}`,
		`{"action":"terminate"}`,
		`{"time":"2017-09-18T08:22:00Z"}`,
		`{"action":"TERMINATE!","time":"2017-09-18T08:22:00Z"}`,
		`{"action":"terminate","time":"2017-09-18T08:22:00Z"}{}`,
		`null`,
		`{"action":"terminate","time":"2017-09-18T08:22:00Z","pad":"` + strings.Repeat("x", MaxBody) + `"}`,
	}
	for _, b := range bad {
		f.setAction(b)
		g0, _, _ := f.counts()
		waitFor(t, "3 polls of a malformed answer", func() bool { g, _, _ := f.counts(); return g >= g0+3 })
	}
	if got := c.get(); len(got) != 0 {
		t.Fatalf("malformed answers delivered %v", got)
	}
	f.setAction(`{"action":"terminate","time":"2017-09-18T08:22:00Z"}`)
	waitFor(t, "the good notice", func() bool { return len(c.get()) > 0 })
	stop()
	if logs.count("parse spot instance-action") == 0 {
		t.Errorf("no parse failure logged")
	}
	if got := c.get(); len(got) != 1 {
		t.Fatalf("delivered %v, want one notice", got)
	}
}

// A server that fails at once must not be asked in a loop: every poll waits
// at least the interval. Slowness only lowers the count, so the bound holds
// on a loaded machine.
func TestEC2NoBusyLoop(t *testing.T) {
	f := newFakeEC2(t)
	f.failNext = 1 << 30
	w, _ := newTestEC2(t, f)
	_, stop := runWatcher(t, w.Run)
	start := time.Now()
	time.Sleep(300 * time.Millisecond)
	stop()
	elapsed := time.Since(start)
	gets, _, _ := f.counts()
	t.Logf("%d polls of a failing server in %v at a %v interval", gets, elapsed, testInterval)
	if limit := int(elapsed/testInterval) + 2; gets > limit {
		t.Fatalf("%d polls in %v, more than one per interval (%d)", gets, elapsed, limit)
	}
}
