package swap

import (
	"time"

	"hostd/dataplane/overload"
	"hostd/dataplane/swapdev"
	"hostd/hostd/events"
)

// sample feeds the device's paging operations to its overload policy every
// swap.sample_interval and publishes the policy's events, until the device
// stops. An operation is a 4 KiB page read or written, as Overdriver counts
// the guest's swap-ins and swap-outs: the guest kernel merges pages into
// NBD requests of up to 128 KiB and more, so requests would undercount
// the paging (and vary with the guest's I/O scheduler).
func (m *Manager) sample(d *device) {
	ctx := d.ctx
	t := time.NewTicker(m.cfg.Swap.SampleInterval.Duration)
	defer t.Stop()
	last := time.Now()
	st := d.dev.Stats()
	lastOps := pages(st)
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			st := d.dev.Stats()
			ops := pages(st)
			s := overload.Sample{At: now, Interval: now.Sub(last), Ops: ops - lastOps}
			last, lastOps = now, ops
			d.mu.Lock()
			evs, err := d.pol.Observe(s)
			d.lastRate = float64(s.Ops) / s.Interval.Seconds()
			if len(evs) > 0 {
				e := evs[len(evs)-1]
				d.last = &e
			}
			d.mu.Unlock()
			if err != nil {
				m.log.Warn("overload sample refused", "vm", d.rec.VM, "err", err)
				continue
			}
			for _, e := range evs {
				m.ev.Publish(events.Event{Type: string(e.Kind), VM: d.rec.VM, Time: e.At, Data: e})
				m.log.Info("swap overload", "vm", d.rec.VM, "event", e.Kind, "duration", e.Duration, "rate", e.Rate, "reason", e.Reason)
			}
		}
	}
}

// pages is the device's paging operations so far: pages read and written.
func pages(st swapdev.Stats) uint64 { return (st.ReadBytes + st.WriteBytes) / swapdev.PageSize }
