package restore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/wire"
)

// errClosed: the restore ended (Close, or residency closed the links).
var errClosed = errors.New("restore connections closed")

// link is one restore connection to the backup, redialled (resuming the
// restore's epoch) after it breaks. Faults and sweeps have one each, so a
// sweep's large answers never sit in front of a fault's.
type link struct {
	r    *Restorer
	name string

	mu      sync.Mutex
	conn    *backupclient.RestoreConn
	dialing chan struct{} // closed when the dial in progress ends
	closed  bool
}

// get returns a usable connection, dialling one if needed (one dial at a
// time; others wait for it).
func (l *link) get(ctx context.Context) (*backupclient.RestoreConn, error) {
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, errClosed
		}
		if l.conn != nil && l.conn.Err() == nil {
			c := l.conn
			l.mu.Unlock()
			return c, nil
		}
		if ch := l.dialing; ch != nil {
			l.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		ch := make(chan struct{})
		l.dialing, l.conn = ch, nil
		l.mu.Unlock()
		c, err := backupclient.DialRestore(ctx, l.r.dialConfig(l.r.epoch, true))
		l.mu.Lock()
		l.dialing = nil
		close(ch)
		if err == nil {
			if l.closed {
				c.Close()
				err = errClosed
			} else {
				l.conn = c
			}
		}
		l.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// drop closes c if it is still the link's connection.
func (l *link) drop(c *backupclient.RestoreConn) {
	l.mu.Lock()
	if l.conn == c {
		l.conn = nil
	}
	l.mu.Unlock()
	c.Close()
}

func (l *link) close() {
	l.mu.Lock()
	c := l.conn
	l.conn, l.closed = nil, true
	l.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// permanent tells a failure that retrying cannot cure (the restore was
// closed, or the backup rejects our requests as malformed) from an outage.
func permanent(err error) bool {
	if errors.Is(err, errClosed) {
		return true
	}
	var we *wire.Error
	if errors.As(err, &we) {
		switch we.Code {
		case wire.CodeProtocol, wire.CodeMalformed:
			return true
		}
	}
	return false
}

// notFound: the backup answers but no longer holds the VM or the restore
// point. The restore waits as through an outage (a store not mounted yet
// comes back; failing the reads would kill the guest), and says so.
func notFound(err error) bool {
	var we *wire.Error
	return errors.As(err, &we) && we.Code == wire.CodeNotFound
}

// fetch reads pages at off with their stored sums over l, retrying through
// outages with exponential backoff: each attempt is bounded (a dial by
// AttemptTimeout, an answer by the connection's stall timeout), the whole
// is unbounded while ctx lives.
func (r *Restorer) fetch(ctx context.Context, l *link, off int64, p []byte, sums []wire.PageSum, sequential bool) error {
	backoff := 50 * time.Millisecond
	for {
		c, err := l.get(ctx)
		if err == nil {
			// A dead backup shows as a stall of the connection
			// (StallTimeout), which breaks it and fails this fetch.
			err = c.FetchPages(ctx, off, p, sums, sequential)
			if err == nil {
				r.reachable()
				return nil
			}
			if ctx.Err() == nil {
				l.drop(c)
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("fetch %d bytes at %d: %w", len(p), off, ctx.Err())
		}
		if permanent(err) {
			return fmt.Errorf("fetch %d bytes at %d: %w", len(p), off, err)
		}
		if notFound(err) {
			r.refused(err)
		}
		r.unreachable(err)
		r.log.Debug("backup fetch failed; retrying", "link", l.name, "backoff", backoff, "err", err)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("fetch %d bytes at %d: %w", len(p), off, ctx.Err())
		}
		backoff = min(2*backoff, r.cfg.MaxBackoff)
	}
}
