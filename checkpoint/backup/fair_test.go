package backup

import (
	"context"
	"testing"
	"time"
)

// TestFairShareRoundRobin: with one slot, a session that queued many reads
// and one that queued a single read alternate; the single read does not
// wait behind the whole backlog.
func TestFairShareRoundRobin(t *testing.T) {
	f := newFairShare(1)
	ctx := context.Background()
	hold, err := f.acquire(ctx, &fairSession{})
	if err != nil {
		t.Fatal(err)
	}
	sweep, fault := &fairSession{}, &fairSession{}
	order := make(chan string, 16)
	start := func(name string, s *fairSession, queued int) {
		ready := make(chan struct{})
		go func() {
			close(ready)
			rel, err := f.acquire(ctx, s)
			if err != nil {
				order <- "error"
				return
			}
			order <- name
			rel()
		}()
		<-ready
		// Let the goroutine queue before the next one (order of arrival).
		for i := 0; i < 1000; i++ {
			f.mu.Lock()
			n := len(s.waiters)
			f.mu.Unlock()
			if n == queued {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	for i := 1; i <= 3; i++ {
		start("sweep", sweep, i)
	}
	start("fault", fault, 1)
	hold()
	var got []string
	for i := 0; i < 4; i++ {
		select {
		case s := <-order:
			got = append(got, s)
		case <-time.After(10 * time.Second):
			t.Fatalf("stuck after %v", got)
		}
	}
	if got[0] != "sweep" || got[1] != "fault" {
		t.Fatalf("grant order %v, want the fault second", got)
	}
}

// TestFairShareCancel: a waiter that gives up leaves the ring, and a slot
// granted to nobody is not lost.
func TestFairShareCancel(t *testing.T) {
	f := newFairShare(1)
	hold, _ := f.acquire(context.Background(), &fairSession{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := f.acquire(ctx, &fairSession{})
		done <- err
	}()
	time.Sleep(10 * time.Millisecond)
	cancel()
	if err := <-done; err == nil {
		t.Fatal("cancelled acquire succeeded")
	}
	hold()
	rel, err := f.acquire(context.Background(), &fairSession{})
	if err != nil {
		t.Fatal(err)
	}
	rel()
	if f.free != 1 || len(f.ring) != 0 {
		t.Fatalf("free %d ring %d after all released", f.free, len(f.ring))
	}
}
