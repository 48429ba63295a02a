package protect

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"hostd/hostd/events"
	"hostd/hostd/store"
)

func getRecord(m *Manager, name string) (Record, error) {
	rec, err := store.Get[Record](m.st, store.BucketProtection, name)
	if errors.Is(err, store.ErrNotFound) {
		return Record{}, fmt.Errorf("VM %q: %w", name, ErrNotProtected)
	}
	return rec, err
}

func listRecords(m *Manager) ([]Record, error) {
	return store.List[Record](m.st, store.BucketProtection)
}

// startEpochs runs the VM's crash-consistent epochs, if it asked for them.
func (m *Manager) startEpochs(r Record) {
	if r.EpochInterval.Duration <= 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if cancel, ok := m.epochs[r.VM]; ok {
		cancel()
	}
	ctx, cancel := context.WithCancel(m.ctx)
	m.epochs[r.VM] = cancel
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(r.EpochInterval.Duration)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if _, err := m.Epoch(ctx, r.VM); err != nil && ctx.Err() == nil {
				m.log.Warn("crash-consistent epoch failed; the last restore point stands", "vm", r.VM, "err", err)
				m.ev.Publish(events.Event{Type: "protection.epoch_failed", VM: r.VM, Data: map[string]string{"error": err.Error()}})
			}
		}
	}()
}

func (m *Manager) stopEpochs(name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cancel, ok := m.epochs[name]; ok {
		cancel()
		delete(m.epochs, name)
	}
}

// Epoch takes one crash-consistent restore point now: flush while running,
// pause, flush the rest with the device state, commit, resume.
func (m *Manager) Epoch(ctx context.Context, name string) (Report, error) {
	rec, err := getRecord(m, name)
	if err != nil {
		return Report{}, err
	}
	rep, err := m.evacuate(ctx, rec, EvacuateRequest{After: AfterResume}, nil, true)
	if err == nil {
		m.mu.Lock()
		m.pauses[name] = time.Duration(rep.PauseMS * float64(time.Millisecond))
		m.mu.Unlock()
	}
	return rep, err
}

// share is the bandwidth share last given to a VM (0: no host limit).
func (m *Manager) share(name string) float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.shares[name]
}

// Run keeps the protected VMs' bandwidth shares in line with their demand
// until ctx ends. Without a host limit (checkpoint.backup_bandwidth = 0)
// there is nothing to share and it only waits.
func (m *Manager) Run(ctx context.Context) {
	total := m.cfg.Checkpoint.BackupBandwidth
	if total <= 0 {
		<-ctx.Done()
		return
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.rebalance(ctx, total)
	}
}

// rebalance gives each protected VM its weighted max-min share. A VM with
// unflushed pages beyond a tenth of its cap is backlogged and may use all
// it gets; a quiet one is given half again what it sent in the last second
// (plus 1 MB/s to grow into), so the rest goes to those that need it.
func (m *Manager) rebalance(ctx context.Context, total float64) {
	recs, err := listRecords(m)
	if err != nil || len(recs) == 0 {
		return
	}
	now := time.Now()
	claims := make([]Claim, len(recs))
	for i, r := range recs {
		claims[i] = Claim{Weight: r.Weight, Demand: math.Inf(1)}
		c, err := m.memClient(ctx, r.VM)
		if err != nil {
			continue
		}
		st, err := c.Status(ctx)
		if err != nil {
			continue
		}
		m.mu.Lock()
		prev, ok := m.sent[r.VM]
		m.sent[r.VM] = sample{st.BytesSent, now}
		m.mu.Unlock()
		if ok && st.Cap > 0 && st.Unflushed < st.Cap/10 {
			rate := float64(st.BytesSent-prev.bytes) / now.Sub(prev.at).Seconds()
			claims[i].Demand = 1.5*max(rate, 0) + 1e6
		}
	}
	shares := Shares(total, claims)
	for i, r := range recs {
		rate := max(shares[i], 1e5) // never zero: a stalled VM could not flush at all
		m.mu.Lock()
		old := m.shares[r.VM]
		m.shares[r.VM] = rate
		m.mu.Unlock()
		if math.Abs(old-rate) < 0.05*rate {
			continue
		}
		if c, err := m.memClient(ctx, r.VM); err == nil {
			if err := c.SetRate(ctx, rate); err != nil {
				m.log.Warn("set bandwidth share", "vm", r.VM, "err", err)
			}
		}
	}
}

type sample struct {
	bytes int64
	at    time.Time
}
