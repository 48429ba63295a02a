package events

import (
	"context"
	"sync"
	"time"
)

// Event is one line of the event stream.
type Event struct {
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time"`
	// Type is dotted: vm.created, vm.started, vm.ready, vm.stopped,
	// vm.deleted, vm.adopted, vm.vanished, job.started, job.progress,
	// job.finished, hypervisor.down, hypervisor.up, vm.memory,
	// swap.created, swap.deleted, events.dropped; the overload policy's
	// events keep the names Overdriver gives them (overload_started,
	// overload_transient_ended, overload_sustained,
	// overload_sustained_ended; see dataplane/overload).
	Type string `json:"type"`
	VM   string `json:"vm,omitempty"`
	Job  string `json:"job,omitempty"`
	// Data carries the type-specific details.
	Data any `json:"data,omitempty"`
}

// Broker fans events out to subscribers.
type Broker struct {
	mu   sync.Mutex
	seq  uint64
	subs map[*subscriber]struct{}
	now  func() time.Time
}

type subscriber struct {
	ch      chan Event
	dropped uint64
}

// NewBroker returns an empty broker.
func NewBroker() *Broker {
	return &Broker{subs: make(map[*subscriber]struct{}), now: time.Now}
}

// Publish stamps e with a sequence number and time and offers it to every
// subscriber without blocking.
func (b *Broker) Publish(e Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	e.Seq = b.seq
	if e.Time.IsZero() {
		e.Time = b.now()
	}
	for s := range b.subs {
		if s.dropped > 0 {
			// Tell the subscriber it lost events before giving it new ones.
			select {
			case s.ch <- Event{Seq: e.Seq, Time: e.Time, Type: "events.dropped", Data: map[string]uint64{"count": s.dropped}}:
				s.dropped = 0
			default:
				s.dropped++
				continue
			}
		}
		select {
		case s.ch <- e:
		default:
			s.dropped++
		}
	}
}

// Subscribe returns a channel of events published from now on, closed when
// ctx ends. buffer bounds how far the subscriber may fall behind.
func (b *Broker) Subscribe(ctx context.Context, buffer int) <-chan Event {
	s := &subscriber{ch: make(chan Event, buffer)}
	b.mu.Lock()
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	go func() {
		<-ctx.Done()
		b.mu.Lock()
		delete(b.subs, s)
		close(s.ch)
		b.mu.Unlock()
	}()
	return s.ch
}
