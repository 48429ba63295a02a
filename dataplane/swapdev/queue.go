package swapdev

import (
	"context"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// queue is the write-through queue to the local file: writes and hole
// punches applied in order by one goroutine, bounded in bytes. Sequence
// numbers let Flush and FUA wait for exactly what they need.
type queue struct {
	mu      sync.Mutex
	items   []item
	bytes   int64
	max     int64
	enq     uint64 // last sequence number pushed
	done    uint64 // last applied (written or failed)
	err     error  // first local write failure: the device refuses writes after it
	closed  bool
	changed chan struct{} // closed and replaced on every change

	syncMu sync.Mutex // one fdatasync at a time
	synced uint64     // everything up to here is durable
}

type item struct {
	seq   uint64
	off   int64
	data  []byte // nil: punch a hole of length punch
	punch int64
	p0, n int // pages, for the pending map
}

func newQueue(max int64) *queue { return &queue{max: max, changed: make(chan struct{})} }

func (q *queue) notifyLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}

// push queues a copy of buf for the local file at off, and publishes the
// copy in pending (pages p0...) before the writer can see the item.
func (q *queue) push(ctx context.Context, off int64, buf []byte, pending *pendingMap, p0 int) (uint64, error) {
	cp := make([]byte, len(buf))
	copy(cp, buf)
	for {
		q.mu.Lock()
		if q.err != nil {
			err := q.err
			q.mu.Unlock()
			return 0, err
		}
		if q.bytes == 0 || q.bytes+int64(len(cp)) <= q.max {
			break
		}
		ch := q.changed
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, fmt.Errorf("wait for room in the write-through queue: %w", ctx.Err())
		}
	}
	defer q.mu.Unlock()
	q.enq++
	n := len(cp) / PageSize
	q.items = append(q.items, item{seq: q.enq, off: off, data: cp, p0: p0, n: n})
	q.bytes += int64(len(cp))
	pending.set(p0, q.enq, cp)
	q.notifyLocked()
	return q.enq, nil
}

// pushTrim queues a hole punch and drops the range's queued pages.
func (q *queue) pushTrim(ctx context.Context, off, length int64, pending *pendingMap, p0, n int) (uint64, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.enq++
	q.items = append(q.items, item{seq: q.enq, off: off, punch: length, p0: p0, n: n})
	pending.drop(p0, n)
	q.notifyLocked()
	return q.enq, nil
}

func (q *queue) last() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.enq
}

func (q *queue) failed() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

func (q *queue) queued() (items int, bytes int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items), q.bytes
}

func (q *queue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.notifyLocked()
}

// durable waits until every item up to seq is applied, then makes the file
// durable (one fdatasync covers everyone waiting).
func (q *queue) durable(ctx context.Context, seq uint64, f *os.File) error {
	for {
		q.mu.Lock()
		if q.done >= seq {
			q.mu.Unlock()
			break
		}
		ch := q.changed
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for the local write-through: %w", ctx.Err())
		}
	}
	q.syncMu.Lock()
	defer q.syncMu.Unlock()
	if q.synced < seq {
		q.mu.Lock()
		upto := q.done
		q.mu.Unlock()
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			q.fail(fmt.Errorf("sync local swap file: %w", err))
		} else {
			q.synced = upto
		}
	}
	return q.failed()
}

func (q *queue) fail(err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.err == nil {
		q.err = err
	}
	q.notifyLocked()
}

// writeLoop applies items in order until the queue is closed and empty.
func (d *Device) writeLoop() {
	q := d.q
	fd := int(d.f.Fd())
	for {
		q.mu.Lock()
		for len(q.items) == 0 {
			if q.closed {
				q.mu.Unlock()
				return
			}
			ch := q.changed
			q.mu.Unlock()
			<-ch
			q.mu.Lock()
		}
		it := q.items[0]
		q.items = q.items[1:]
		q.mu.Unlock()

		var err error
		if it.data != nil {
			_, err = d.f.WriteAt(it.data, it.off)
		} else {
			err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, it.off, it.punch)
		}
		if err != nil {
			// The pages stay in the pending map (in memory, still readable)
			// and the device refuses writes from now on: an error the NBD
			// client sees, never a silently lost page.
			d.log.Error("local swap file write failed; the device refuses writes", "offset", it.off, "err", err)
			q.fail(fmt.Errorf("write local swap file at %d: %w", it.off, err))
		} else if it.data != nil {
			d.pending.deleteIf(it.p0, it.n, it.seq)
		}
		q.mu.Lock()
		q.done = it.seq
		q.bytes -= int64(len(it.data))
		q.notifyLocked()
		q.mu.Unlock()
	}
}

// pendingMap holds the newest queued copy of each page not yet in the
// local file: reads look here first.
type pendingMap struct {
	mu sync.Mutex
	m  map[int]pendingPage
}

type pendingPage struct {
	seq  uint64
	data []byte
}

func (p *pendingMap) set(p0 int, seq uint64, buf []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k := 0; k < len(buf)/PageSize; k++ {
		p.m[p0+k] = pendingPage{seq, buf[k*PageSize : (k+1)*PageSize]}
	}
}

func (p *pendingMap) get(i int, dst []byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	pp, ok := p.m[i]
	if ok {
		copy(dst, pp.data)
	}
	return ok
}

func (p *pendingMap) drop(p0, n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := p0; i < p0+n; i++ {
		delete(p.m, i)
	}
}

func (p *pendingMap) deleteIf(p0, n int, seq uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := p0; i < p0+n; i++ {
		if pp, ok := p.m[i]; ok && pp.seq == seq {
			delete(p.m, i)
		}
	}
}

func (p *pendingMap) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.m)
}
