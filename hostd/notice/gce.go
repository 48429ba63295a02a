package notice

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// GCE watches the instance/preempted metadata key, "FALSE" until the
// instance is preempted and "TRUE" from then on; the instance stops
// GCEWarning later. It long-polls (wait_for_change with last_etag), so it
// hears of a preemption the moment the key changes, and falls back to one
// plain GET per interval after a failed long-poll or when the server does not
// support it (no ETag).
type GCE struct {
	Endpoint
	// WaitTimeout bounds one long-poll (GCE's timeout_sec, so whole
	// seconds); DefaultGCEWait if zero.
	WaitTimeout time.Duration
	// PlainPolling turns long-polling off: one GET per interval.
	PlainPolling bool
}

// DefaultGCEWait is how long one long-poll waits for a change before the
// server answers with the unchanged value.
const DefaultGCEWait = time.Minute

const (
	gcePreemptedPath = "/computeMetadata/v1/instance/preempted"
	gceFlavorHeader  = "Metadata-Flavor"
	gceFlavor        = "Google"
	// gcePreemptedID is the notice ID: an instance is preempted once.
	gcePreemptedID = "preempted"
)

// Run polls until ctx ends, calling onNotice once when the instance is
// preempted. It returns an error only for an invalid configuration, at once.
func (w *GCE) Run(ctx context.Context, onNotice func(Notice)) error {
	e, err := w.Endpoint.resolve(GCEProvider, GCEInterval, GCEWarning)
	if err != nil {
		return err
	}
	wait := w.WaitTimeout
	if wait == 0 {
		wait = DefaultGCEWait
	}
	if wait < 0 {
		return fmt.Errorf("gce watcher: wait timeout %v is negative", wait)
	}
	// Round up to GCE's whole seconds, so the request deadline (the wait
	// plus the request timeout) always covers what the server may take.
	wait = (wait + time.Second - 1).Truncate(time.Second)
	s := &gceSession{e: e, wait: wait, plain: w.PlainPolling}
	e.run(ctx, s.poll, onNotice, nil)
	return nil
}

// gceSession is one Run's long-poll state.
type gceSession struct {
	e    endpoint
	wait time.Duration
	// plain: long-polling is off, by configuration or because the server
	// sends no ETag.
	plain bool
	// etag of the last answer; empty until a plain GET has given one, so
	// the first long-poll compares against the value the watcher has seen
	// (a long-poll without last_etag would wait for the *next* change and
	// miss a preemption that happened before hostd started).
	etag string
	// retryPlain: the last long-poll failed; look with a plain GET first.
	retryPlain bool
}

func (s *gceSession) poll(ctx context.Context) ([]Notice, time.Duration, error) {
	long := !s.plain && !s.retryPlain && s.etag != ""
	path, extra := gcePreemptedPath, time.Duration(0)
	if long {
		path += "?" + url.Values{
			"wait_for_change": {"true"},
			"last_etag":       {s.etag},
			"timeout_sec":     {strconv.Itoa(int(s.wait / time.Second))},
		}.Encode()
		extra = s.wait
	}
	start := time.Now()
	a, err := s.e.call(ctx, http.MethodGet, path, map[string]string{gceFlavorHeader: gceFlavor}, nil, extra)
	if err == nil && a.status != http.StatusOK {
		err = unexpected(http.MethodGet, gcePreemptedPath, a)
	}
	if err == nil && a.header.Get(gceFlavorHeader) != gceFlavor {
		err = fmt.Errorf("GET %s: the answer lacks %s: %s, so it is not from a GCE metadata server", gcePreemptedPath, gceFlavorHeader, gceFlavor)
	}
	var preempted bool
	if err == nil {
		preempted, err = parseGCEPreempted(a.body)
		if err != nil {
			err = fmt.Errorf("GET %s: %w", gcePreemptedPath, err)
		}
	}
	if err != nil {
		if long {
			s.retryPlain = true
		}
		return nil, 0, err
	}
	received := time.Now()
	s.retryPlain = false

	// Choose the wait before the next look. Whatever it is, last_etag
	// makes the next long-poll return at once if the key changed
	// meanwhile, so the wait never loses a change; it only has to keep a
	// server that ignores wait_for_change from being asked in a loop.
	var next time.Duration
	tag := a.header.Get("ETag")
	switch {
	case s.plain:
	case tag == "":
		s.plain = true
		s.e.log.Info("metadata server sends no ETag; polling preempted every interval instead of long-polling", "interval", s.e.interval)
	case !long, tag != s.etag, time.Since(start) >= s.wait/2:
		// After a plain GET, a change, or a long-poll the server really
		// held: long-poll again right away.
		next = max(s.e.interval/10, time.Millisecond)
	}
	s.etag = tag

	if !preempted {
		return nil, next, nil
	}
	return []Notice{{
		Provider: GCEProvider,
		ID:       gcePreemptedID,
		Action:   "preempt",
		Deadline: received.Add(GCEWarning),
		Received: received,
		Detail:   "instance/preempted is TRUE; GCE stops the instance about 30 s later",
	}}, next, nil
}

// parseGCEPreempted reads the preempted key: exactly TRUE or FALSE, with
// nothing but ASCII white space around it.
func parseGCEPreempted(b []byte) (bool, error) {
	switch string(bytes.Trim(b, " \t\r\n")) {
	case "TRUE":
		return true, nil
	case "FALSE":
		return false, nil
	}
	if len(b) > 40 {
		return false, fmt.Errorf("parse preempted: %d bytes, not TRUE or FALSE", len(b))
	}
	return false, fmt.Errorf("parse preempted: %q is not TRUE or FALSE", b)
}
