package vm

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"hostd/hostd/events"
	"hostd/hostd/store"
	"hostd/xen"
)

// ReconcileReport says what a reconciliation changed.
type ReconcileReport struct {
	Adopted  []string `json:"adopted,omitempty"`  // running domains hostd took (back) under its care
	Vanished []string `json:"vanished,omitempty"` // records whose domain is gone
	Returned []string `json:"returned,omitempty"` // vanished records whose domain is back
}

// Reconcile brings the records in line with the hypervisor. At startup
// (a new daemon, perhaps after a kill -9) every domain that still runs is
// adopted: hostd resumes watching it and never restarts or stops it.
func (m *Manager) Reconcile(ctx context.Context, startup bool) (ReconcileReport, error) {
	var rep ReconcileReport
	doms, err := m.hv.List(ctx)
	if err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	recs, err := store.List[Record](m.st, store.BucketVMs)
	if err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	live := make(map[string]xen.DomainInfo, len(doms))
	for _, d := range doms {
		live[d.Name] = d
	}
	known := make(map[string]bool, len(recs))
	for _, rec := range recs {
		known[rec.Domain()] = true
		d, ok := live[rec.Domain()]
		switch {
		case !ok && !rec.Vanished:
			rec.Vanished = true
			rep.Vanished = append(rep.Vanished, rec.Name)
		case ok && rec.Vanished:
			rec.Vanished = false
			rep.Returned = append(rep.Returned, rec.Name)
		case ok && startup && d.State != xen.StateShutoff:
			rep.Adopted = append(rep.Adopted, rec.Name)
		default:
			continue
		}
		if ok {
			rec.UUID = d.UUID
			m.resumeWatch(rec, d)
		}
		if err := store.Put(m.st, store.BucketVMs, rec.Name, rec); err != nil {
			return rep, fmt.Errorf("reconcile: %w", err)
		}
	}
	// Domains carrying hostd's spec but no record: the store was lost or the
	// daemon died between defining and recording. Take them back.
	for _, d := range doms {
		if known[d.Name] || IsSlot(d.Name) {
			continue // a warm slot is the slot manager's
		}
		// List carries no specs; read this domain's to see whether it is ours.
		full, err := m.hv.Domain(ctx, d.Name)
		if err != nil || full.Spec == nil || !m.ownsFiles(*full.Spec) {
			continue // gone meanwhile, not made by hostd, or another hostd's
		}
		rec := Record{Name: d.Name, UUID: d.UUID, Spec: *full.Spec, Created: time.Now().UTC(), Adopted: true}
		if err := store.Put(m.st, store.BucketVMs, rec.Name, rec); err != nil {
			return rep, fmt.Errorf("reconcile: adopt %q: %w", d.Name, err)
		}
		m.resumeWatch(rec, d)
		rep.Adopted = append(rep.Adopted, rec.Name)
	}
	for _, n := range rep.Adopted {
		m.ev.Publish(events.Event{Type: "vm.adopted", VM: n})
	}
	for _, n := range rep.Vanished {
		m.ev.Publish(events.Event{Type: "vm.vanished", VM: n})
	}
	for _, n := range rep.Returned {
		m.ev.Publish(events.Event{Type: "vm.returned", VM: n})
	}
	if len(rep.Adopted)+len(rep.Vanished)+len(rep.Returned) > 0 {
		m.log.Info("reconciled with hypervisor", "adopted", rep.Adopted, "vanished", rep.Vanished, "returned", rep.Returned)
	}
	return rep, nil
}

// ownsFiles reports whether a spec's files live in this hostd's state
// directory: another hostd on the same hypervisor (a second instance, a
// test) records its spec too, and its VMs are not this one's to adopt.
func (m *Manager) ownsFiles(s xen.DomainSpec) bool {
	dir, err := m.cfg.VMDir(s.Name)
	return err == nil && strings.HasPrefix(s.RAMPath, dir+string(filepath.Separator))
}

// inOwnDirs reports whether path lies inside hostd's state or run
// directory (and is neither of them).
func (m *Manager) inOwnDirs(path string) bool {
	p := filepath.Clean(path)
	for _, d := range []string{m.cfg.StateDir, m.cfg.RunDir} {
		if rel, err := filepath.Rel(filepath.Clean(d), p); err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

// resumeWatch restarts the readiness watcher of a running VM that had not
// announced itself when the previous daemon stopped.
func (m *Manager) resumeWatch(rec Record, d xen.DomainInfo) {
	if rec.Started != nil && rec.Ready == nil && d.State == xen.StateRunning {
		if _, watching := m.watchers[rec.Name]; !watching {
			m.watchReady(rec.Name, rec.Spec.SerialLog, rec.SerialOffset, *rec.Started)
		}
	}
}

// Run adopts what the hypervisor runs (the startup reconcile), then follows
// its lifecycle events and reconciles every interval until ctx ends. Events
// are hints: state is always re-read.
func (m *Manager) Run(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var evs <-chan xen.LifecycleEvent
	subscribe := func() {
		ch, err := m.hv.Events(ctx)
		if err != nil {
			m.log.Warn("subscribe to hypervisor events; retrying at the next reconcile", "err", err)
			return
		}
		evs = ch
	}
	subscribe()
	adopted := false
	reconcile := func() {
		if _, err := m.Reconcile(ctx, !adopted); err != nil {
			m.log.Warn("reconcile with hypervisor; retrying", "err", err)
			return
		}
		adopted = true
	}
	reconcile()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if !adopted {
				reconcile()
			} else if _, err := m.Reconcile(ctx, false); err != nil {
				m.log.Warn("periodic reconcile", "err", err)
			}
			if evs == nil {
				subscribe()
			}
		case e, ok := <-evs:
			if !ok {
				evs = nil
				continue
			}
			m.onLifecycle(ctx, e)
		}
	}
}

func (m *Manager) onLifecycle(ctx context.Context, e xen.LifecycleEvent) {
	if e.Event == xen.EventReconnected {
		// Events of the gap are lost: re-read everything.
		m.ev.Publish(events.Event{Type: "hypervisor.reconnected"})
		if _, err := m.Reconcile(ctx, false); err != nil {
			m.log.Warn("reconcile after hypervisor reconnect", "err", err)
		}
		return
	}
	name, ok := m.byDomain(e.Domain)
	if !ok {
		return // not one of ours
	}
	m.ev.Publish(events.Event{Type: "vm.lifecycle", VM: name, Time: e.Time,
		Data: map[string]string{"event": e.Event, "detail": e.Detail}})
	switch e.Event {
	case xen.EventStopped, xen.EventCrashed:
		m.mu.Lock()
		m.stopWatcher(name)
		m.mu.Unlock()
	case xen.EventUndefined:
		if _, err := m.Reconcile(ctx, false); err != nil {
			m.log.Warn("reconcile after undefine", "vm", name, "err", err)
		}
	}
}

// byDomain finds the VM a domain runs: the VM of that name, or the one
// restored into a slot of that name.
func (m *Manager) byDomain(domain string) (string, bool) {
	if rec, err := m.record(domain); err == nil && rec.Domain() == domain {
		return rec.Name, true
	}
	if !IsSlot(domain) {
		return "", false
	}
	recs, err := store.List[Record](m.st, store.BucketVMs)
	if err != nil {
		return "", false
	}
	for _, r := range recs {
		if r.Domain() == domain {
			return r.Name, true
		}
	}
	return "", false
}
