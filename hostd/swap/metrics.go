package swap

import "github.com/prometheus/client_golang/prometheus"

// Collector exports the swap devices' counters and overload state, read
// at scrape time.
type Collector struct {
	m                                    *Manager
	pages, ops, rate, overloaded, linkUp *prometheus.Desc
}

// NewCollector returns a collector over m.
func NewCollector(m *Manager) *Collector {
	return &Collector{
		m:          m,
		pages:      prometheus.NewDesc("hostd_swap_pages", "Pages of a VM's swap device by where they are (remote: in a repository and on local disk).", []string{"vm", "where"}, nil),
		ops:        prometheus.NewDesc("hostd_swap_operations_total", "Swap device operations by kind.", []string{"vm", "op"}, nil),
		rate:       prometheus.NewDesc("hostd_swap_paging_rate", "Pages read and written per second over the last sampling interval (the overload policy's rate).", []string{"vm"}, nil),
		overloaded: prometheus.NewDesc("hostd_swap_overloaded", "1 while the VM's overload policy sees an overload.", []string{"vm"}, nil),
		linkUp:     prometheus.NewDesc("hostd_swap_repo_connected", "1 if the device is connected to the repository.", []string{"vm", "repo"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.pages, c.ops, c.rate, c.overloaded, c.linkUp} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.m.List() {
		g := func(d *prometheus.Desc, v float64, l ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{s.VM}, l...)...)
		}
		n := func(op string, v uint64) {
			ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, float64(v), s.VM, op)
		}
		g(c.pages, float64(s.Stats.PagesRemote), "remote")
		g(c.pages, float64(s.Stats.PagesLocalOnly), "local_only")
		g(c.pages, float64(s.Stats.PagesQueued), "queued")
		n("read", s.Stats.ReadOps)
		n("write", s.Stats.WriteOps)
		n("trim", s.Stats.TrimOps)
		n("flush", s.Stats.FlushOps)
		g(c.rate, s.Overload.Rate)
		over := 0.0
		if s.Overload.Overloaded {
			over = 1
		}
		g(c.overloaded, over)
		for _, r := range s.Stats.Repos {
			up := 0.0
			if r.Connected {
				up = 1
			}
			g(c.linkUp, up, r.Addr)
		}
	}
}
