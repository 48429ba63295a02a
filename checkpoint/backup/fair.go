package backup

import (
	"context"
	"sync"
)

// fairShare hands a fixed number of disk-read slots to restore sessions in
// turn. A waiting session joins the back of a ring; each freed slot goes
// to the session at the front, which rejoins the back if it still waits.
// Reads are cut into quanta of equal size before they ask for a slot, so a
// session sweeping a whole image (a full restore, a prefetcher) and a
// session faulting single pages get the same number of turns: the sweep
// cannot starve the faults, and concurrent restores share the backup's
// read bandwidth evenly.
type fairShare struct {
	mu   sync.Mutex
	free int
	ring []*fairSession // sessions with waiters, in turn order
}

// fairSession is one session's place in the ring.
type fairSession struct {
	waiters []chan struct{}
	inRing  bool
}

func newFairShare(slots int) *fairShare { return &fairShare{free: slots} }

// acquire waits for a slot for sess; the returned release gives it back.
func (f *fairShare) acquire(ctx context.Context, sess *fairSession) (release func(), err error) {
	f.mu.Lock()
	if f.free > 0 && len(f.ring) == 0 {
		f.free--
		f.mu.Unlock()
		return f.release, nil
	}
	ch := make(chan struct{})
	sess.waiters = append(sess.waiters, ch)
	if !sess.inRing {
		sess.inRing = true
		f.ring = append(f.ring, sess)
	}
	f.mu.Unlock()
	select {
	case <-ch:
		return f.release, nil
	case <-ctx.Done():
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, w := range sess.waiters {
		if w == ch {
			sess.waiters = append(sess.waiters[:i], sess.waiters[i+1:]...)
			if len(sess.waiters) == 0 {
				f.leaveRingLocked(sess)
			}
			return nil, ctx.Err()
		}
	}
	// Granted while we gave up: pass the slot on.
	f.releaseLocked()
	return nil, ctx.Err()
}

func (f *fairShare) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.releaseLocked()
}

func (f *fairShare) releaseLocked() {
	if len(f.ring) == 0 {
		f.free++
		return
	}
	s := f.ring[0]
	f.ring = f.ring[1:]
	ch := s.waiters[0]
	s.waiters = s.waiters[1:]
	if len(s.waiters) > 0 {
		f.ring = append(f.ring, s)
	} else {
		s.inRing = false
	}
	close(ch)
}

func (f *fairShare) leaveRingLocked(sess *fairSession) {
	sess.inRing = false
	for i, s := range f.ring {
		if s == sess {
			f.ring = append(f.ring[:i], f.ring[i+1:]...)
			return
		}
	}
}
