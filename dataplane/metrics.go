package dataplane

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Collector exports the counters of every connector on this host as
// Prometheus metrics, read from the dataplane at scrape time so nothing is
// cached or double counted.
type Collector struct {
	dp                           Dataplane
	packets, bytes, drops, conns *prometheus.Desc
}

// NewCollector returns a collector for dp; register it with the daemon's
// registry.
func NewCollector(dp Dataplane) *Collector {
	l := []string{"connector", "direction"}
	return &Collector{dp: dp,
		packets: prometheus.NewDesc("hostd_connector_packets_total", "Frames through a connector on this host; tx: from local endpoints, rx: delivered to them.", l, nil),
		bytes:   prometheus.NewDesc("hostd_connector_bytes_total", "Bytes through a connector on this host.", l, nil),
		drops:   prometheus.NewDesc("hostd_connector_drops_total", "Frames of a connector this host could not deliver.", []string{"connector"}, nil),
		conns:   prometheus.NewDesc("hostd_connectors", "Connectors configured on this host.", []string{"backend"}, nil),
	}
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.packets, c.bytes, c.drops, c.conns} {
		ch <- d
	}
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	// Collect has no context of its own; a scrape must not hang on netlink.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := c.dp.List(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.conns, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(len(list)), string(c.dp.Backend()))
	for _, conn := range list {
		s, err := c.dp.Stats(ctx, conn.ID)
		if err != nil {
			continue // deleted since List
		}
		id := strconv.FormatUint(uint64(conn.ID), 10)
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(s.TxPackets), id, "tx")
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(s.RxPackets), id, "rx")
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(s.TxBytes), id, "tx")
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(s.RxBytes), id, "rx")
		ch <- prometheus.MustNewConstMetric(c.drops, prometheus.CounterValue, float64(s.Drops), id)
	}
}
