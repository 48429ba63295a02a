package notice

import (
	"strings"
	"testing"
	"time"
)

// The parsers read what a metadata server sends, which hostd does not
// control: whatever the bytes, they must return a valid result or an error,
// never panic, and never both.

func FuzzParseEC2InstanceAction(f *testing.F) {
	for _, s := range []string{
		`{"action":"terminate","time":"2017-09-18T08:22:00Z"}`,
		`{"action":"stop","time":"2017-09-18T08:22:00.123+02:00"}`,
		`{"action":"hibernate","time":"2017-09-18T08:22:00Z","extra":[1,2]}`,
		`{"action":"terminate","time":"2017-13-45T08:22:00Z"}`,
		`{"action":"","time":""}`,
		`{"action":1}`, `null`, `[]`, `{`, `{}{}`, "\xff\xfe",
		`{"action":"terminate","time":"` + strings.Repeat("9", 1000) + `"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		action, deadline, err := parseEC2InstanceAction(b)
		if err != nil {
			if action != "" || !deadline.IsZero() {
				t.Fatalf("error %v with a result %q %v", err, action, deadline)
			}
			return
		}
		if action == "" || len(action) > maxActionLen || strings.Trim(action, "abcdefghijklmnopqrstuvwxyz") != "" {
			t.Fatalf("accepted action %q", action)
		}
		if deadline.IsZero() || deadline.Location() != time.UTC {
			t.Fatalf("accepted deadline %v", deadline)
		}
	})
}

func FuzzParseGCEPreempted(f *testing.F) {
	for _, s := range []string{"TRUE", "FALSE", "TRUE\n", " FALSE ", "true", "TRUE\x00", "", "TRUEFALSE", "\xc2\xa0TRUE"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		preempted, err := parseGCEPreempted(b)
		trimmed := strings.Trim(string(b), " \t\r\n")
		switch {
		case err != nil && preempted:
			t.Fatalf("error %v with preempted set", err)
		case err == nil && trimmed != "TRUE" && trimmed != "FALSE":
			t.Fatalf("accepted %q", b)
		case err == nil && preempted != (trimmed == "TRUE"):
			t.Fatalf("%q read as preempted=%v", b, preempted)
		case err != nil && (trimmed == "TRUE" || trimmed == "FALSE"):
			t.Fatalf("rejected %q: %v", b, err)
		}
	})
}

func FuzzParseAzureEvents(f *testing.F) {
	for _, s := range []string{
		`{"DocumentIncarnation":0,"Events":[]}`,
		`{"DocumentIncarnation":1,"Events":[{"EventId":"602d9444-d2cd-49c7-8624-8643e7171297","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["FrontEnd_IN_0","BackEnd_IN_0"],"EventStatus":"Scheduled","NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT","Description":"","EventSource":"Platform","DurationInSeconds":-1}]}`,
		`{"DocumentIncarnation":2,"Events":[{"EventId":"x","EventType":"Freeze","EventStatus":"Started","NotBefore":""}]}`,
		`{"DocumentIncarnation":2,"Events":[{"EventId":"x","EventType":"Preempt","EventStatus":"Scheduled","NotBefore":"Mon, 32 Sep 2016 18:29:47 GMT"}]}`,
		`{"DocumentIncarnation":-1,"Events":[]}`,
		`{"DocumentIncarnation":1e400,"Events":[]}`,
		`{"DocumentIncarnation":1,"Events":null}`,
		`{"DocumentIncarnation":1,"Events":[null]}`,
		`{"DocumentIncarnation":1,"Events":[{"EventId":"x","EventType":"Preempt","EventStatus":"Scheduled","Resources":[null]}]}`,
		`null`, `{`, `"x"`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := parseAzureEvents(b)
		if err != nil {
			if doc.Events != nil || doc.DocumentIncarnation != 0 {
				t.Fatalf("error %v with a result %+v", err, doc)
			}
			return
		}
		if doc.DocumentIncarnation < 0 {
			t.Fatalf("accepted incarnation %d", doc.DocumentIncarnation)
		}
		for _, ev := range doc.Events {
			if ev.EventID == "" || ev.EventType == "" || ev.EventStatus == "" {
				t.Fatalf("accepted event %+v", ev)
			}
			if !ev.notBefore.IsZero() && ev.notBefore.Location() != time.UTC {
				t.Fatalf("NotBefore %v not in UTC", ev.notBefore)
			}
		}
	})
}
