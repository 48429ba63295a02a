package libvirt

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	golibvirt "libvirt.org/go/libvirt"

	"hostd/xen"
)

// eventLoop is the one piece of package-level state, and it mirrors the C
// library: libvirt's default event loop is process-wide, can be registered
// only once, before the first connection, and never unregistered. Keepalives,
// close callbacks and domain events all need it running.
var eventLoop struct {
	once sync.Once
	err  error
}

func startEventLoop() error {
	eventLoop.once.Do(func() {
		if err := golibvirt.EventRegisterDefaultImpl(); err != nil {
			eventLoop.err = fmt.Errorf("register libvirt event loop: %w", err)
			return
		}
		// Lives as long as the process, like the C loop it drives.
		go func() {
			for {
				if err := golibvirt.EventRunDefaultImpl(); err != nil {
					// Only fails on a broken loop; do not spin on it.
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	})
	return eventLoop.err
}

// session is one connection to libvirtd. A session that lost its daemon is
// never revived; the driver dials a new one.
type session struct {
	conn *golibvirt.Connect
	// lost is set by the close callback (from the event loop) or by a call
	// that saw a connection error.
	lost atomic.Bool
	// lifecycleID is the libvirt callback id of the lifecycle event
	// registration on this connection, -1 if none.
	lifecycleID int
}

func (s *session) alive() bool {
	if s.lost.Load() {
		return false
	}
	ok, err := s.conn.IsAlive()
	return err == nil && ok
}

// dial opens a connection and hooks what a session needs: keepalive (so a
// daemon that stops answering is noticed, not waited on forever), the close
// callback (so a daemon that went away is noticed before the next call) and
// the lifecycle event callback.
func (d *Driver) dial() (*session, error) {
	conn, err := golibvirt.NewConnect(d.cfg.URI)
	if err != nil {
		return nil, wrapErr(fmt.Sprintf("connect to %s", d.cfg.URI), err)
	}
	s := &session{conn: conn, lifecycleID: -1}
	interval := int(d.cfg.KeepAliveInterval / time.Second)
	if err := conn.SetKeepAlive(interval, d.cfg.KeepAliveCount); err != nil {
		conn.Close()
		return nil, wrapErr("set libvirt keepalive", err)
	}
	if err := conn.RegisterCloseCallback(func(_ *golibvirt.Connect, reason golibvirt.ConnectCloseReason) {
		d.log.Warn("libvirt connection closed", "uri", d.cfg.URI, "reason", closeReason(reason))
		s.lost.Store(true)
		d.signalLost()
	}); err != nil {
		conn.Close()
		return nil, wrapErr("register libvirt close callback", err)
	}
	id, err := conn.DomainEventLifecycleRegister(nil, d.onLifecycle)
	if err != nil {
		conn.UnregisterCloseCallback()
		conn.Close()
		return nil, wrapErr("register libvirt lifecycle events", err)
	}
	s.lifecycleID = id
	return s, nil
}

// retire drops the driver's reference on a session. Calls still running on
// it hold their own reference, so the connection is closed by the last one.
func (d *Driver) retire(s *session) {
	s.lost.Store(true)
	if s.lifecycleID >= 0 {
		// Fails harmlessly when the daemon is gone.
		_ = s.conn.DomainEventDeregister(s.lifecycleID)
		s.lifecycleID = -1
	}
	_ = s.conn.UnregisterCloseCallback()
	_, _ = s.conn.Close()
}

// acquire returns a live session with a reference held for the caller, who
// gives it back with release. It reconnects when the current session is
// lost; if libvirtd is away that fails fast (the socket refuses).
func (d *Driver) acquire() (*session, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("libvirt driver: %w: the driver was closed", xen.ErrUnavailable)
	}
	if s := d.sess; s != nil {
		if s.alive() {
			if err := s.conn.Ref(); err == nil {
				return s, nil
			}
		}
		d.sess = nil
		d.retire(s)
	}
	s, err := d.dial()
	if err != nil {
		return nil, err
	}
	if err := s.conn.Ref(); err != nil {
		d.retire(s)
		return nil, wrapErr("reference libvirt connection", err)
	}
	d.sess = s
	d.generation++
	if d.generation > 1 {
		d.log.Info("reconnected to libvirt", "uri", d.cfg.URI, "generation", d.generation)
		d.publish(xen.LifecycleEvent{Time: time.Now(), Event: xen.EventReconnected})
	}
	return s, nil
}

func (d *Driver) release(s *session) {
	_, _ = s.conn.Close()
}

// signalLost wakes the reconnect loop; it never blocks (it runs on the event
// loop).
func (d *Driver) signalLost() {
	select {
	case d.lostc <- struct{}{}:
	default:
	}
}

// reconnectLoop reconnects after the daemon went away even when no call
// comes, so that event subscribers hear from the new daemon.
func (d *Driver) reconnectLoop() {
	defer d.wg.Done()
	for {
		select {
		case <-d.done:
			return
		case <-d.lostc:
		}
		for attempt := 1; ; attempt++ {
			s, err := d.acquire()
			if err == nil {
				d.release(s)
				break
			}
			if errors.Is(err, xen.ErrUnavailable) && attempt == 1 {
				d.log.Info("libvirt unavailable, retrying", "uri", d.cfg.URI, "every", d.cfg.ReconnectInterval)
			}
			select {
			case <-d.done:
				return
			case <-time.After(d.cfg.ReconnectInterval):
			}
		}
	}
}

// call runs fn on a live connection. The caller's ctx bounds the wait, not
// fn: libvirt calls cannot be cancelled, so on ctx's end fn finishes in the
// background and its result is dropped. A connection error marks the session
// lost so that the next call reconnects.
func (d *Driver) call(ctx context.Context, op string, fn func(*golibvirt.Connect) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	res := make(chan error, 1)
	go func() {
		s, err := d.acquire()
		if err != nil {
			res <- err
			return
		}
		defer d.release(s)
		err = fn(s.conn)
		if isConnError(err) {
			s.lost.Store(true)
			d.signalLost()
		}
		res <- err
	}()
	select {
	case err := <-res:
		return wrapErr(op, err)
	case <-ctx.Done():
		return fmt.Errorf("%s: %w (the libvirt call goes on in the background)", op, ctx.Err())
	}
}

// withDomain runs fn on the named domain.
func (d *Driver) withDomain(ctx context.Context, op, name string, fn func(*golibvirt.Connect, *golibvirt.Domain) error) error {
	return d.call(ctx, fmt.Sprintf("%s domain %q", op, name), func(conn *golibvirt.Connect) error {
		dom, err := conn.LookupDomainByName(name)
		if err != nil {
			return err
		}
		defer dom.Free()
		return fn(conn, dom)
	})
}

func closeReason(r golibvirt.ConnectCloseReason) string {
	switch r {
	case golibvirt.CONNECT_CLOSE_REASON_ERROR:
		return "error"
	case golibvirt.CONNECT_CLOSE_REASON_EOF:
		return "eof"
	case golibvirt.CONNECT_CLOSE_REASON_KEEPALIVE:
		return "keepalive"
	case golibvirt.CONNECT_CLOSE_REASON_CLIENT:
		return "client"
	}
	return fmt.Sprintf("reason-%d", int(r))
}
