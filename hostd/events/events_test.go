package events

import (
	"context"
	"testing"
	"time"
)

func TestFanOutAndOrder(t *testing.T) {
	b := NewBroker()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, c := b.Subscribe(ctx, 8), b.Subscribe(ctx, 8)
	for _, typ := range []string{"vm.created", "vm.started"} {
		b.Publish(Event{Type: typ, VM: "x"})
	}
	for _, ch := range []<-chan Event{a, c} {
		e1, e2 := <-ch, <-ch
		if e1.Type != "vm.created" || e2.Type != "vm.started" || e2.Seq != e1.Seq+1 || e1.Time.IsZero() {
			t.Fatalf("got %+v then %+v", e1, e2)
		}
	}
}

func TestSlowSubscriberGetsDroppedMarkerNotAStall(t *testing.T) {
	b := NewBroker()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := b.Subscribe(ctx, 2)
	for i := 0; i < 10; i++ { // must not block although nobody reads
		b.Publish(Event{Type: "job.progress"})
	}
	<-ch
	<-ch // the buffer held two; eight were dropped
	b.Publish(Event{Type: "vm.stopped"})
	m := <-ch
	if m.Type != "events.dropped" || m.Data.(map[string]uint64)["count"] != 8 {
		t.Fatalf("want a dropped marker counting 8, got %+v", m)
	}
	if e := <-ch; e.Type != "vm.stopped" {
		t.Fatalf("after the marker: %+v", e)
	}
}

func TestUnsubscribeClosesChannel(t *testing.T) {
	b := NewBroker()
	ctx, cancel := context.WithCancel(context.Background())
	ch := b.Subscribe(ctx, 1)
	cancel()
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("expected closed channel")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed after cancel")
	}
}
