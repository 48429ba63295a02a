package jobs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"hostd/hostd/errdefs"
	"hostd/hostd/events"
	"hostd/hostd/store"
)

func open(t *testing.T, dir string) *store.Store {
	t.Helper()
	s, err := store.Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestJobLifecycleAndPersistence(t *testing.T) {
	dir := t.TempDir()
	st := open(t, dir)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	m, err := NewManager(st, events.NewBroker(), log)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	release := make(chan struct{})
	j, err := m.Start(ctx, "shutdown", "vm1", func(ctx context.Context, p *Progress) (any, error) {
		p.Set(0.5, "waiting")
		<-release
		return map[string]int{"ms": 42}, nil
	})
	if err != nil || j.State != Running {
		t.Fatalf("start: %+v %v", j, err)
	}
	bad, _ := m.Start(ctx, "shutdown", "vm2", func(ctx context.Context, p *Progress) (any, error) {
		return nil, errors.New("guest ignored ACPI")
	})
	refused := errdefs.New(errdefs.ErrNotFound, "restore_point_not_found", "no such restore point")
	coded, _ := m.Start(ctx, "restore", "vm3", func(ctx context.Context, p *Progress) (any, error) {
		return nil, fmt.Errorf("restore VM \"vm3\": %w: epoch 9", refused)
	})
	close(release)
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := m.Get(j.ID)
	if err != nil || got.State != Succeeded || got.Progress != 1 || got.Finished == nil || got.Report == nil {
		t.Fatalf("finished job: %+v %v", got, err)
	}
	if got, _ := m.Get(bad.ID); got.State != Failed || got.Error != "guest ignored ACPI" {
		t.Fatalf("failed job: %+v", got)
	}
	// A failed job carries its cause's code; an uncoded cause is internal.
	if got, _ := m.Get(coded.ID); got.State != Failed || got.Code != "restore_point_not_found" {
		t.Fatalf("failed job with a coded cause: %+v", got)
	}
	if got, _ := m.Get(bad.ID); got.Code != errdefs.Internal {
		t.Fatalf("failed job with an uncoded cause has code %q", got.Code)
	}
	if _, err := m.Get("job-nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown job: %v", err)
	}
	st.Close()

	// Reopened: both results are still there.
	st = open(t, dir)
	defer st.Close()
	m, _ = NewManager(st, events.NewBroker(), log)
	all, err := m.List()
	if err != nil || len(all) != 3 || all[0].ID != j.ID {
		t.Fatalf("after reopen: %+v %v", all, err)
	}
}

func TestRunningJobsAreMarkedInterruptedOnRestart(t *testing.T) {
	dir := t.TempDir()
	st := open(t, dir)
	// A record left "running" is what a kill -9 leaves behind.
	if err := store.Put(st, store.BucketJobs, "job-1", Job{ID: "job-1", Kind: "shutdown", State: Running}); err != nil {
		t.Fatal(err)
	}
	m, err := NewManager(st, events.NewBroker(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	j, _ := m.Get("job-1")
	if j.State != Interrupted || j.Error == "" || j.Finished == nil {
		t.Fatalf("got %+v", j)
	}
	st.Close()
}

// Finished jobs older than the retention are pruned; newer ones and
// running ones stay.
func TestPruneRemovesOnlyOldFinishedJobs(t *testing.T) {
	st := open(t, t.TempDir())
	defer st.Close()
	m, err := NewManager(st, events.NewBroker(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m.now = func() time.Time { return clock }
	done := func(context.Context, *Progress) (any, error) { return nil, nil }
	old, _ := m.Start(ctx, "shutdown", "a", done)
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(10 * 24 * time.Hour)
	recent, _ := m.Start(ctx, "shutdown", "b", done)
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	running, _ := m.Start(ctx, "restore", "c", func(ctx context.Context, p *Progress) (any, error) {
		<-release
		return nil, nil
	})
	defer func() { close(release); m.Wait(ctx) }()

	n, err := m.Prune(7 * 24 * time.Hour)
	if err != nil || n != 1 {
		t.Fatalf("prune: %d %v, want 1 job removed", n, err)
	}
	if _, err := m.Get(old.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the old finished job is still there: %v", err)
	}
	for _, id := range []string{recent.ID, running.ID} {
		if _, err := m.Get(id); err != nil {
			t.Fatalf("job %s was pruned: %v", id, err)
		}
	}
}
