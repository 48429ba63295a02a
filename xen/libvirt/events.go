package libvirt

import (
	"context"
	"time"

	golibvirt "libvirt.org/go/libvirt"

	"hostd/xen"
)

// eventBuffer is each subscriber's queue; a subscriber that falls further
// behind loses events (they are hints, see xen.Hypervisor.Events).
const eventBuffer = 256

// Events delivers lifecycle events of all domains until ctx ends. One
// libvirt registration per connection feeds every subscriber; it is
// registered again when the driver reconnects, and subscribers then get an
// xen.EventReconnected event.
func (d *Driver) Events(ctx context.Context) (<-chan xen.LifecycleEvent, error) {
	// Connect now, so a subscriber learns at once that libvirtd is away.
	if err := d.call(ctx, "subscribe to events", func(*golibvirt.Connect) error { return nil }); err != nil {
		return nil, err
	}
	ch := make(chan xen.LifecycleEvent, eventBuffer)
	d.subMu.Lock()
	d.subs[ch] = struct{}{}
	d.subMu.Unlock()
	go func() {
		select {
		case <-ctx.Done():
		case <-d.done:
		}
		d.subMu.Lock()
		if _, ok := d.subs[ch]; ok {
			delete(d.subs, ch)
			close(ch)
		}
		d.subMu.Unlock()
	}()
	return ch, nil
}

// publish hands ev to every subscriber without blocking.
func (d *Driver) publish(ev xen.LifecycleEvent) {
	d.subMu.Lock()
	defer d.subMu.Unlock()
	for ch := range d.subs {
		select {
		case ch <- ev:
		default:
			d.log.Debug("event dropped, subscriber behind", "domain", ev.Domain, "event", ev.Event)
		}
	}
}

// onLifecycle runs on libvirt's event loop.
func (d *Driver) onLifecycle(_ *golibvirt.Connect, dom *golibvirt.Domain, e *golibvirt.DomainEventLifecycle) {
	name, _ := dom.GetName()
	uuid, _ := dom.GetUUIDString()
	ev, detail := eventNames(e.Event, e.Detail)
	d.publish(xen.LifecycleEvent{Time: time.Now(), Domain: name, UUID: uuid, Event: ev, Detail: detail})
}

// eventNames maps libvirt's event and detail numbers to the names in
// xen.LifecycleEvent.
func eventNames(ev golibvirt.DomainEventType, detail int) (string, string) {
	switch ev {
	case golibvirt.DOMAIN_EVENT_DEFINED:
		return xen.EventDefined, pick(detail, "added", "updated", "renamed", "from_snapshot")
	case golibvirt.DOMAIN_EVENT_UNDEFINED:
		return xen.EventUndefined, pick(detail, "removed", "renamed")
	case golibvirt.DOMAIN_EVENT_STARTED:
		return xen.EventStarted, pick(detail, "booted", "migrated", "restored", "from_snapshot", "wakeup")
	case golibvirt.DOMAIN_EVENT_SUSPENDED:
		return xen.EventSuspended, pick(detail, "paused", "migrated", "ioerror", "watchdog", "restored",
			"from_snapshot", "api_error", "postcopy", "postcopy_failed")
	case golibvirt.DOMAIN_EVENT_RESUMED:
		return xen.EventResumed, pick(detail, "unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed")
	case golibvirt.DOMAIN_EVENT_STOPPED:
		return xen.EventStopped, pick(detail, "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot")
	case golibvirt.DOMAIN_EVENT_SHUTDOWN:
		return xen.EventShutdown, pick(detail, "finished", "guest", "host")
	case golibvirt.DOMAIN_EVENT_PMSUSPENDED:
		return xen.EventPMSuspended, pick(detail, "memory", "disk")
	case golibvirt.DOMAIN_EVENT_CRASHED:
		return xen.EventCrashed, pick(detail, "panicked", "crashloaded")
	}
	return "unknown", ""
}

// pick returns names[i]: libvirt's detail enums count from 0 in the order
// of its headers (libvirt-domain.h), which the lists above follow.
func pick(i int, names ...string) string {
	if i >= 0 && i < len(names) {
		return names[i]
	}
	return ""
}
