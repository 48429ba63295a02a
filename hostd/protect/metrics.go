package protect

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"hostd/checkpoint/memserver"
)

// histograms are the distributions of what the host's protections did:
// evacuations (their time and whether the bound held), crash-consistent
// epochs' pauses and restores' resumes. They live in the Manager, which
// observes them, and are exported by its Collector.
type histograms struct {
	evacuation *prometheus.HistogramVec // label bound_held
	epochPause prometheus.Histogram
	resume     *prometheus.HistogramVec // label slot: warm | cold
}

func newHistograms() histograms {
	return histograms{
		evacuation: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "hostd_evacuation_seconds", Help: "Evacuations from their start to the durable commit, by whether the bound held.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}, []string{"bound_held"}),
		epochPause: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "hostd_protection_epoch_pause_seconds", Help: "Guest pauses of crash-consistent epochs.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}),
		resume: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "hostd_restore_resume_seconds", Help: "Restores from the request to the guest running, by slot (warm or cold).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}, []string{"slot"}),
	}
}

func (h histograms) collectors() []prometheus.Collector {
	return []prometheus.Collector{h.evacuation, h.epochPause, h.resume}
}

// Collector exports every protected VM's figures, read from its memory
// server at scrape time, and the Manager's histograms.
type Collector struct {
	m                                                  *Manager
	headroom, unflushed, capB, bw, share, state, pause *prometheus.Desc
}

// NewCollector returns a Prometheus collector over m.
func NewCollector(m *Manager) *Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, append([]string{"vm"}, labels...), nil)
	}
	return &Collector{
		m:         m,
		headroom:  d("hostd_protection_headroom_seconds", "Bound minus the predicted evacuation time (negative: the bound would be missed)."),
		unflushed: d("hostd_protection_unflushed_bytes", "Guest memory dirty or queued, not yet sent to the backup."),
		capB:      d("hostd_protection_dirty_cap_bytes", "Cap on unflushed memory derived from the bound and bandwidth."),
		bw:        d("hostd_protection_bandwidth_bytes_per_second", "Measured bandwidth to the backup."),
		share:     d("hostd_protection_share_bytes_per_second", "The VM's share of the host's backup bandwidth (0: no host limit)."),
		state:     d("hostd_protection_state", "1 for the VM's protection state.", "state"),
		pause:     d("hostd_protection_last_epoch_pause_seconds", "Pause of the VM's last crash-consistent epoch (all of them: hostd_protection_epoch_pause_seconds)."),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.headroom, c.unflushed, c.capB, c.bw, c.share, c.state, c.pause} {
		ch <- d
	}
	for _, h := range c.m.hist.collectors() {
		h.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.m.hist.collectors() {
		h.Collect(ch)
	}
	ctx, cancel := context.WithTimeout(c.m.ctx, 2*time.Second)
	defer cancel()
	l, err := c.m.List(ctx)
	if err != nil {
		return
	}
	g := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, s := range l {
		g(c.headroom, s.HeadroomMS/1000, s.VM)
		g(c.unflushed, float64(s.UnflushedBytes), s.VM)
		g(c.capB, float64(s.CapBytes), s.VM)
		g(c.bw, s.BandwidthBps, s.VM)
		g(c.share, s.ShareBps, s.VM)
		g(c.pause, s.LastEpochPauseMS/1000, s.VM)
		for _, st := range []memserver.State{memserver.StateCopying, memserver.StateProtected, memserver.StateDegraded} {
			v := 0.0
			if s.State == st {
				v = 1
			}
			g(c.state, v, s.VM, string(st))
		}
	}
}
