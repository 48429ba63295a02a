package notice

import (
	"net/http"
	"slices"
	"testing"
	"time"
)

func newTestAzure(t *testing.T, f *fakeAzure) (*Azure, *logBuffer) {
	log, buf := testLogger(t)
	return &Azure{Endpoint: Endpoint{BaseURL: f.srv.URL, Interval: testInterval, Log: log, RequestTimeout: 200 * time.Millisecond}}, buf
}

func TestFakeAzureRequiresHeader(t *testing.T) {
	f := newFakeAzure(t, "vm0")
	resp, err := http.Get(f.srv.URL + azureEventsPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("GET without Metadata: true: status %d, want 400", resp.StatusCode)
	}
}

// Events that are not notices (Freeze) or concern another VM are ignored;
// a Preempt for this VM is delivered once with NotBefore as its deadline.
func TestAzurePreemptMidRun(t *testing.T) {
	f := newFakeAzure(t, "vm0")
	w, _ := newTestAzure(t, f)
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "3 polls", func() bool { r, _ := f.snapshot(); return r >= 3 })
	f.setDoc(`{"DocumentIncarnation":1,"Events":[
		{"EventId":"F1","EventStatus":"Scheduled","EventType":"Freeze","ResourceType":"VirtualMachine","Resources":["vm0"],"NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT","Description":"","EventSource":"Platform","DurationInSeconds":5},
		{"EventId":"P-other","EventStatus":"Scheduled","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm1"],"NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT"}]}`)
	r0, _ := f.snapshot()
	waitFor(t, "5 polls", func() bool { r, _ := f.snapshot(); return r >= r0+5 })
	if got := c.get(); len(got) != 0 {
		t.Fatalf("delivered %v for events that are not this VM's notices", got)
	}
	f.setDoc(`{"DocumentIncarnation":2,"Events":[
		{"EventId":"P-other","EventStatus":"Scheduled","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm1"],"NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT"},
		{"EventId":"P-mine","EventStatus":"Scheduled","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm1","vm0"],"NotBefore":"Mon, 19 Sep 2016 18:30:17 GMT","Description":"spot eviction","EventSource":"Platform","DurationInSeconds":-1}]}`)
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	r0, _ = f.snapshot()
	waitFor(t, "5 more polls", func() bool { r, _ := f.snapshot(); return r >= r0+5 })
	stop()
	got := c.get()
	if len(got) != 1 {
		t.Fatalf("delivered %d notices, want 1: %v", len(got), got)
	}
	n := got[0]
	if n.Provider != AzureProvider || n.ID != "P-mine" || n.Action != "preempt" || !n.Deadline.Equal(time.Date(2016, 9, 19, 18, 30, 17, 0, time.UTC)) {
		t.Fatalf("notice %+v, want azure preempt P-mine at 18:30:17", n)
	}
	if _, acks := f.snapshot(); len(acks) != 0 {
		t.Fatalf("acknowledged %v with Acknowledge off", acks)
	}
}

// A blank NotBefore means 30 s from now for a scheduled event and now for a
// started one; Terminate is a notice too; acknowledgement when asked for.
func TestAzureBlankNotBeforeAndAcknowledge(t *testing.T) {
	f := newFakeAzure(t, "vm0")
	f.setDoc(`{"DocumentIncarnation":7,"Events":[
		{"EventId":"A","EventStatus":"Scheduled","EventType":"Preempt","Resources":["vm0"],"NotBefore":""},
		{"EventId":"B","EventStatus":"Started","EventType":"Terminate","Resources":[],"NotBefore":""}]}`)
	w, _ := newTestAzure(t, f)
	w.Acknowledge = true
	c, stop := runWatcher(t, w.Run)
	waitFor(t, "two acknowledgements", func() bool { _, acks := f.snapshot(); return len(acks) >= 2 })
	stop()
	got := c.get()
	if len(got) != 2 {
		t.Fatalf("delivered %v, want 2 notices", got)
	}
	for _, n := range got {
		switch n.ID {
		case "A":
			if n.Action != "preempt" || !n.Deadline.Equal(n.Received.Add(AzureWarning)) {
				t.Errorf("scheduled event with blank NotBefore: %+v, want deadline 30 s after receipt", n)
			}
		case "B":
			if n.Action != "terminate" || !n.Deadline.Equal(n.Received) {
				t.Errorf("started event: %+v, want deadline at receipt", n)
			}
		default:
			t.Errorf("unexpected notice %+v", n)
		}
	}
	if _, acks := f.snapshot(); !slices.Equal(acks, []string{"A", "B"}) {
		t.Fatalf("acknowledged %v, want [A B] once each", acks)
	}
}

func TestAzureErrorsThenNotice(t *testing.T) {
	f := newFakeAzure(t, "vm0")
	f.failNext, f.hangNext = 3, 2
	w, logs := newTestAzure(t, f)
	w.VMName = "vm0"
	c, _ := runWatcher(t, w.Run)
	waitFor(t, "the failures to pass", func() bool { r, _ := f.snapshot(); return r >= 6 })
	f.setDoc(`{"DocumentIncarnation":3,"Events":[{"EventId":"P","EventStatus":"Scheduled","EventType":"Preempt","Resources":["vm0"],"NotBefore":"Tue, 01 Jan 2030 00:00:30 GMT"}]}`)
	waitFor(t, "the notice", func() bool { return len(c.get()) > 0 })
	if logs.count("metadata poll failed") == 0 || logs.count("works again") == 0 {
		t.Errorf("failures or recovery not logged")
	}
}

func TestAzureMalformed(t *testing.T) {
	f := newFakeAzure(t, "vm0")
	w, logs := newTestAzure(t, f)
	c, stop := runWatcher(t, w.Run)
	bad := []string{
		`{"DocumentIncarnation":1,"Events":[{"EventId":"P","EventStatus":"Scheduled","EventType":"Preempt","Resources":["vm0"],"NotBefore":"tomorrow"}]}`,
		`{"DocumentIncarnation":1,"Events":[{"EventStatus":"Scheduled","EventType":"Preempt","Resources":["vm0"]}]}`,
		`{"DocumentIncarnation":1}`,
		`{"Events":[]}`,
		`{"DocumentIncarnation":1.5,"Events":[]}`,
		`{"DocumentIncarnation":1,"Events":[{"EventId":"P","EventStatus":"Scheduled","EventType":"Preempt","Resources":"vm0"}]}`,
		`[1,2,3]`,
		`{"DocumentIncarnation":1,"Events":[]} trailing`,
	}
	for _, b := range bad {
		f.setDoc(b)
		r0, _ := f.snapshot()
		waitFor(t, "3 polls", func() bool { r, _ := f.snapshot(); return r >= r0+3 })
	}
	stop()
	if got := c.get(); len(got) != 0 {
		t.Fatalf("delivered %v from malformed documents", got)
	}
	if logs.count("parse scheduled events") == 0 {
		t.Errorf("parse failures not logged")
	}
}
