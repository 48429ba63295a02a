package jobs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"hostd/hostd/errdefs"
	"hostd/hostd/events"
	"hostd/hostd/store"
)

// State of a job.
type State string

const (
	Running     State = "running"
	Succeeded   State = "succeeded"
	Failed      State = "failed"
	Interrupted State = "interrupted" // the daemon stopped while it ran
)

// Job is the record the API returns.
type Job struct {
	ID       string     `json:"id"`
	Kind     string     `json:"kind"`
	VM       string     `json:"vm,omitempty"`
	State    State      `json:"state"`
	Progress float64    `json:"progress"` // 0..1
	Phase    string     `json:"phase,omitempty"`
	Created  time.Time  `json:"created"`
	Finished *time.Time `json:"finished,omitempty"`
	Error    string     `json:"error,omitempty"`
	// Code is the failure's API code (errdefs), the same an API request
	// failing for that cause answers with: what went wrong, not where.
	Code string `json:"code,omitempty"`
	// Report is the operation's final report (timings, bytes, ...).
	Report any `json:"report,omitempty"`
}

// ErrNotFound: no job with that ID.
var ErrNotFound = errdefs.New(errdefs.ErrNotFound, "not_found", "job not found")

// Func is the body of a job. It reports progress through p and returns its
// final report. It must return when ctx ends.
type Func func(ctx context.Context, p *Progress) (report any, err error)

// Manager starts jobs and keeps their records.
type Manager struct {
	store  *store.Store
	events *events.Broker
	log    *slog.Logger

	mu   sync.Mutex
	live map[string]*Job // running jobs; finished ones are read from the store
	wg   sync.WaitGroup
	now  func() time.Time
}

// NewManager marks jobs left running by a previous daemon as interrupted.
func NewManager(st *store.Store, ev *events.Broker, log *slog.Logger) (*Manager, error) {
	m := &Manager{store: st, events: ev, log: log, live: make(map[string]*Job), now: time.Now}
	old, err := store.List[Job](st, store.BucketJobs)
	if err != nil {
		return nil, fmt.Errorf("jobs: load: %w", err)
	}
	for _, j := range old {
		if j.State != Running {
			continue
		}
		t := m.now()
		j.State, j.Finished = Interrupted, &t
		j.Error = "hostd stopped while this job ran; check the VM's state and retry the operation"
		j.Code = "interrupted"
		if err := store.Put(st, store.BucketJobs, j.ID, j); err != nil {
			return nil, fmt.Errorf("jobs: mark %s interrupted: %w", j.ID, err)
		}
		log.Warn("job interrupted by a daemon restart", "job", j.ID, "kind", j.Kind, "vm", j.VM)
	}
	return m, nil
}

// Start runs fn in the background under ctx (the daemon's lifetime, not the
// request's) and returns the job's first record.
func (m *Manager) Start(ctx context.Context, kind, vm string, fn Func) (Job, error) {
	id, err := newID()
	if err != nil {
		return Job{}, fmt.Errorf("start %s job: %w", kind, err)
	}
	j := &Job{ID: id, Kind: kind, VM: vm, State: Running, Created: m.now()}
	if err := store.Put(m.store, store.BucketJobs, id, *j); err != nil {
		return Job{}, fmt.Errorf("start %s job: %w", kind, err)
	}
	m.mu.Lock()
	m.live[id] = j
	snapshot := *j
	m.mu.Unlock()
	m.events.Publish(events.Event{Type: "job.started", Job: id, VM: vm, Data: map[string]string{"kind": kind}})

	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		report, err := fn(ctx, &Progress{m: m, id: id})
		m.finish(id, report, err)
	}()
	return snapshot, nil
}

func (m *Manager) finish(id string, report any, err error) {
	m.mu.Lock()
	j := m.live[id]
	delete(m.live, id)
	t := m.now()
	j.Finished, j.Report = &t, report
	j.State, j.Progress = Succeeded, 1
	if err != nil {
		j.State, j.Error, j.Code = Failed, err.Error(), errdefs.Code(err)
	}
	final := *j
	m.mu.Unlock()
	if perr := store.Put(m.store, store.BucketJobs, id, final); perr != nil {
		m.log.Error("job result not persisted", "job", id, "err", perr)
	}
	m.log.Info("job finished", "job", id, "kind", final.Kind, "vm", final.VM, "state", final.State, "err", final.Error)
	m.events.Publish(events.Event{Type: "job.finished", Job: id, VM: final.VM, Data: final})
}

// Prune removes the finished jobs that ended before olderThan ago (running
// jobs always stay) and returns how many it removed.
func (m *Manager) Prune(olderThan time.Duration) (int, error) {
	all, err := store.List[Job](m.store, store.BucketJobs)
	if err != nil {
		return 0, fmt.Errorf("prune jobs: %w", err)
	}
	cutoff := m.now().Add(-olderThan)
	n := 0
	for _, j := range all {
		m.mu.Lock()
		_, live := m.live[j.ID]
		m.mu.Unlock()
		if live || j.State == Running || j.Finished == nil || !j.Finished.Before(cutoff) {
			continue
		}
		if err := m.store.Delete(store.BucketJobs, j.ID); err != nil {
			return n, fmt.Errorf("prune job %s: %w", j.ID, err)
		}
		n++
	}
	return n, nil
}

// PruneEvery prunes at start and then every interval until ctx ends.
func (m *Manager) PruneEvery(ctx context.Context, interval, olderThan time.Duration) {
	for {
		if n, err := m.Prune(olderThan); err != nil {
			m.log.Warn("prune finished jobs", "err", err)
		} else if n > 0 {
			m.log.Info("finished jobs pruned", "count", n, "older_than", olderThan)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// Get returns a job, running or finished.
func (m *Manager) Get(id string) (Job, error) {
	m.mu.Lock()
	if j, ok := m.live[id]; ok {
		defer m.mu.Unlock()
		return *j, nil
	}
	m.mu.Unlock()
	j, err := store.Get[Job](m.store, store.BucketJobs, id)
	if errors.Is(err, store.ErrNotFound) {
		return Job{}, fmt.Errorf("get job %q: %w", id, ErrNotFound)
	}
	return j, err
}

// List returns all jobs, oldest first.
func (m *Manager) List() ([]Job, error) {
	all, err := store.List[Job](m.store, store.BucketJobs)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	for i := range all {
		if j, ok := m.live[all[i].ID]; ok {
			all[i] = *j
		}
	}
	m.mu.Unlock()
	// IDs are random, so order by creation time.
	slices.SortStableFunc(all, func(a, b Job) int { return a.Created.Compare(b.Created) })
	return all, nil
}

// Wait blocks until every running job has returned or ctx ends.
func (m *Manager) Wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for jobs: %w", ctx.Err())
	}
}

// Progress is handed to a running job to report how far it is.
type Progress struct {
	m  *Manager
	id string
}

// Set records progress (0..1) and the current phase, and publishes it.
// Progress is kept in memory only: a restart marks the job interrupted anyway.
func (p *Progress) Set(fraction float64, phase string) {
	p.m.mu.Lock()
	j := p.m.live[p.id]
	j.Progress, j.Phase = min(max(fraction, 0), 1), phase
	vm := j.VM
	p.m.mu.Unlock()
	p.m.events.Publish(events.Event{Type: "job.progress", Job: p.id, VM: vm,
		Data: map[string]any{"progress": fraction, "phase": phase}})
}

func newID() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "job-" + hex.EncodeToString(b), nil
}
