package notice

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"time"
)

// Azure watches Scheduled Events for a Preempt (spot eviction) or Terminate
// (deletion) event that concerns this VM. Events of other types (Freeze,
// Reboot, Redeploy) are not notices: the VM comes back.
//
// Scheduled Events lists events for every VM of an availability set or
// scale set, naming the affected ones in Resources; the watcher compares
// them with this VM's name, looked up once from the instance metadata
// unless VMName gives it.
type Azure struct {
	Endpoint
	// Acknowledge approves each notified event (POST StartRequests) after
	// onNotice returns, which lets Azure act before NotBefore. Off by
	// default: hostd wants the whole warning.
	Acknowledge bool
	// VMName is this VM's name as Resources lists it; looked up from
	// /metadata/instance/compute/name if empty.
	VMName string
}

const (
	azureEventsPath = "/metadata/scheduledevents?api-version=2020-07-01"
	azureNamePath   = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
	azureHeader     = "Metadata"
	// maxNameLen: Azure VM names are at most 64 characters (Windows 15).
	maxNameLen = 256
)

// Run polls until ctx ends, calling onNotice once per Preempt or Terminate
// event for this VM. It returns an error only for an invalid configuration,
// at once.
func (w *Azure) Run(ctx context.Context, onNotice func(Notice)) error {
	e, err := w.Endpoint.resolve(AzureProvider, AzureInterval, AzureWarning)
	if err != nil {
		return err
	}
	if len(w.VMName) > maxNameLen {
		return fmt.Errorf("azure watcher: VM name of %d bytes is longer than %d", len(w.VMName), maxNameLen)
	}
	s := &azureSession{e: e, name: w.VMName}
	var ack func(context.Context, Notice)
	if w.Acknowledge {
		ack = s.acknowledge
	}
	e.run(ctx, s.poll, onNotice, ack)
	return nil
}

// azureSession is one Run's knowledge of this VM's name.
type azureSession struct {
	e    endpoint
	name string
}

func (s *azureSession) poll(ctx context.Context) ([]Notice, time.Duration, error) {
	a, err := s.e.call(ctx, http.MethodGet, azureEventsPath, map[string]string{azureHeader: "true"}, nil, 0)
	if err != nil {
		return nil, 0, err
	}
	if a.status != http.StatusOK {
		return nil, 0, unexpected(http.MethodGet, azureEventsPath, a)
	}
	received := time.Now()
	doc, err := parseAzureEvents(a.body)
	if err != nil {
		return nil, 0, fmt.Errorf("GET %s: %w", azureEventsPath, err)
	}
	var notices []Notice
	for _, ev := range doc.Events {
		var action string
		switch ev.EventType {
		case "Preempt":
			action = "preempt"
		case "Terminate":
			action = "terminate"
		default:
			continue
		}
		// An event naming no resource is taken as this VM's: a wrong
		// evacuation costs a little, a missed one costs the VMs.
		if len(ev.Resources) > 0 {
			if s.name == "" {
				if err := s.lookUpName(ctx); err != nil {
					return nil, 0, err
				}
			}
			if !slices.Contains(ev.Resources, s.name) {
				continue
			}
		}
		deadline := ev.notBefore
		switch {
		case !deadline.IsZero():
		case ev.EventStatus == "Started":
			// Azure blanks NotBefore once the event has started: the
			// VM is going now.
			deadline = received
		default:
			deadline = received.Add(AzureWarning)
		}
		notices = append(notices, Notice{
			Provider: AzureProvider,
			ID:       ev.EventID,
			Action:   action,
			Deadline: deadline,
			Received: received,
			Detail:   fmt.Sprintf("scheduled event %s %s (%s, incarnation %d): %s", ev.EventType, ev.EventID, ev.EventStatus, doc.DocumentIncarnation, truncate(ev.Description, 200)),
		})
	}
	return notices, 0, nil
}

// lookUpName asks the instance metadata for this VM's name.
func (s *azureSession) lookUpName(ctx context.Context) error {
	a, err := s.e.call(ctx, http.MethodGet, azureNamePath, map[string]string{azureHeader: "true"}, nil, 0)
	if err != nil {
		return fmt.Errorf("look up this VM's name: %w", err)
	}
	if a.status != http.StatusOK {
		return fmt.Errorf("look up this VM's name: %w", unexpected(http.MethodGet, azureNamePath, a))
	}
	name, err := parseAzureName(a.body)
	if err != nil {
		return fmt.Errorf("look up this VM's name: %w", err)
	}
	s.name = name
	return nil
}

// acknowledge approves the event behind n, so Azure may start it before
// NotBefore. A failure is only logged: the event starts at NotBefore anyway.
func (s *azureSession) acknowledge(ctx context.Context, n Notice) {
	body, err := json.Marshal(azureStartRequests{StartRequests: []azureStartRequest{{EventID: n.ID}}})
	if err != nil {
		s.e.log.Warn("acknowledge scheduled event", "id", n.ID, "err", err)
		return
	}
	hdr := map[string]string{azureHeader: "true", "Content-Type": "application/json"}
	a, err := s.e.call(ctx, http.MethodPost, azureEventsPath, hdr, body, 0)
	if err == nil && a.status != http.StatusOK {
		err = unexpected(http.MethodPost, azureEventsPath, a)
	}
	if err != nil {
		s.e.log.Warn("acknowledge scheduled event; it will start at its NotBefore instead", "id", n.ID, "err", err)
		return
	}
	s.e.log.Info("acknowledged scheduled event", "id", n.ID)
}

type azureStartRequests struct {
	StartRequests []azureStartRequest `json:"StartRequests"`
}

type azureStartRequest struct {
	EventID string `json:"EventId"`
}

// azureDocument is the Scheduled Events answer.
type azureDocument struct {
	DocumentIncarnation int64
	Events              []azureEvent
}

// azureEvent is one scheduled event, the fields the watcher uses; notBefore
// is NotBefore parsed (zero when Azure left it blank).
type azureEvent struct {
	EventID     string
	EventType   string
	Resources   []string
	EventStatus string
	Description string
	notBefore   time.Time
}

// azureWire mirrors the JSON with pointers, so a missing required field is
// told apart from an empty one.
type azureWire struct {
	DocumentIncarnation *int64 `json:"DocumentIncarnation"`
	Events              *[]struct {
		EventID     *string  `json:"EventId"`
		EventType   *string  `json:"EventType"`
		Resources   []string `json:"Resources"`
		EventStatus *string  `json:"EventStatus"`
		NotBefore   string   `json:"NotBefore"`
		Description string   `json:"Description"`
	} `json:"Events"`
}

// parseAzureEvents reads a Scheduled Events document. DocumentIncarnation
// and Events are required, and each event needs an EventId, an EventType
// and an EventStatus; NotBefore is blank or an HTTP date ("Mon, 19 Sep 2016
// 18:29:47 GMT"). Fields Azure may add later are ignored.
func parseAzureEvents(b []byte) (azureDocument, error) {
	var w azureWire
	if err := decodeStrict(b, &w); err != nil {
		return azureDocument{}, fmt.Errorf("parse scheduled events: %w", err)
	}
	if w.DocumentIncarnation == nil || *w.DocumentIncarnation < 0 {
		return azureDocument{}, fmt.Errorf("parse scheduled events: DocumentIncarnation is missing or negative")
	}
	if w.Events == nil {
		return azureDocument{}, fmt.Errorf("parse scheduled events: Events is missing")
	}
	doc := azureDocument{DocumentIncarnation: *w.DocumentIncarnation}
	for i, e := range *w.Events {
		if e.EventID == nil || *e.EventID == "" || e.EventType == nil || *e.EventType == "" || e.EventStatus == nil || *e.EventStatus == "" {
			return azureDocument{}, fmt.Errorf("parse scheduled events: event %d lacks an EventId, EventType or EventStatus", i)
		}
		ev := azureEvent{EventID: *e.EventID, EventType: *e.EventType, Resources: e.Resources, EventStatus: *e.EventStatus, Description: e.Description}
		if e.NotBefore != "" {
			t, err := time.Parse(http.TimeFormat, e.NotBefore)
			if err != nil {
				return azureDocument{}, fmt.Errorf("parse scheduled events: event %s: NotBefore: %w", truncate(ev.EventID, 64), err)
			}
			if t.IsZero() {
				// The zero time stands for a blank NotBefore below.
				return azureDocument{}, fmt.Errorf("parse scheduled events: event %s: NotBefore %s is the zero time", truncate(ev.EventID, 64), e.NotBefore)
			}
			ev.notBefore = t.UTC()
		}
		doc.Events = append(doc.Events, ev)
	}
	return doc, nil
}

// parseAzureName reads compute/name: one line of printable ASCII.
func parseAzureName(b []byte) (string, error) {
	if len(b) == 0 || len(b) > maxNameLen {
		return "", fmt.Errorf("VM name of %d bytes is empty or longer than %d", len(b), maxNameLen)
	}
	for _, c := range b {
		if c < ' ' || c > '~' {
			return "", fmt.Errorf("VM name holds byte %#x, which is not printable ASCII", c)
		}
	}
	return string(b), nil
}

// truncate shortens s for a log line.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
