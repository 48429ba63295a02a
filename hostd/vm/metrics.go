package vm

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Collector exports the VMs' state and boot times, read at scrape time so
// the numbers are never stale.
type Collector struct {
	m      *Manager
	states *prometheus.Desc
	boot   *prometheus.Desc
	up     *prometheus.Desc
}

// NewCollector returns a collector over m.
func NewCollector(m *Manager) *Collector {
	return &Collector{
		m:      m,
		states: prometheus.NewDesc("hostd_vms", "VMs of this host by state.", []string{"state"}, nil),
		boot:   prometheus.NewDesc("hostd_vm_boot_seconds", "Start to guest-agent-ready time of the VM's last boot.", []string{"vm"}, nil),
		up:     prometheus.NewDesc("hostd_hypervisor_up", "1 if the hypervisor answered the last scrape.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.states
	ch <- c.boot
	ch <- c.up
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(c.m.ctx, 5*time.Second)
	defer cancel()
	vms, err := c.m.List(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	counts := map[string]float64{}
	for _, v := range vms {
		state := string(v.State)
		if v.Vanished {
			state = "vanished"
		}
		counts[state]++
		if v.Ready != nil {
			ch <- prometheus.MustNewConstMetric(c.boot, prometheus.GaugeValue, v.BootMS/1000, v.Name)
		}
	}
	for s, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.states, prometheus.GaugeValue, n, s)
	}
}
