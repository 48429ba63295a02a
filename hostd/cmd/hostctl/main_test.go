package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/hostd/client"
	"hostd/hostd/jobs"
)

// A job's outcome decides the command's exit in both output formats.
func TestJobOutFailsOnAFailedJobInEveryFormat(t *testing.T) {
	for _, tc := range []struct {
		state jobs.State
		fail  bool
	}{{jobs.Succeeded, false}, {jobs.Failed, true}, {jobs.Interrupted, true}} {
		for _, asJSON := range []bool{false, true} {
			var out bytes.Buffer
			a := &cli{json: asJSON, out: &out}
			j := jobs.Job{ID: "job-1", Kind: "restore", State: tc.state}
			if tc.fail {
				j.Error, j.Code = "no such restore point", "restore_point_not_found"
			}
			err := a.jobOut(j, nil)
			if (err != nil) != tc.fail {
				t.Errorf("%s, json %v: err %v, want failure %v", tc.state, asJSON, err, tc.fail)
			}
			if tc.fail && !strings.Contains(err.Error(), j.Code) {
				t.Errorf("%s: the error does not name the code: %v", tc.state, err)
			}
			if asJSON {
				var back jobs.Job
				if json.Unmarshal(out.Bytes(), &back) != nil || back.ID != j.ID || back.Code != j.Code {
					t.Errorf("%s: JSON output %q", tc.state, out.String())
				}
			} else if !strings.Contains(out.String(), "job-1") {
				t.Errorf("%s: table output %q", tc.state, out.String())
			}
		}
	}
}

// hostctl events fails when hostd closes the stream (it stopped), after
// printing what it received; a stream the user ends is not a failure.
func TestEventsFailsWhenHostdGoesAway(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hostd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		fmt.Fprintln(w, `{"seq":1,"type":"vm.created","vm":"web"}`)
		// and the daemon stops: the stream ends
	})}
	go srv.Serve(l)
	defer srv.Close()
	var out bytes.Buffer
	a := &cli{c: client.New(sock), out: &out}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = a.run(ctx, []string{"events"})
	if err == nil || !strings.Contains(err.Error(), "closed the stream") {
		t.Fatalf("events after hostd went away: %v, want an error", err)
	}
	if !strings.Contains(out.String(), "vm.created") {
		t.Fatalf("the event before the end was not printed: %q", out.String())
	}
}

// A stream the user ends (Ctrl-C: the context) is not a failure.
func TestEventsEndedByTheUserIsNoFailure(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hostd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	streaming := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		close(streaming)
		<-r.Context().Done() // a live daemon keeps the stream open
	})}
	go srv.Serve(l)
	defer srv.Close()
	a := &cli{c: client.New(sock), out: io.Discard}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.run(ctx, []string{"events"}) }()
	select {
	case <-streaming:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream never started")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("events ended by the user: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("events did not end with its context")
	}
}
