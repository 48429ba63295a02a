package swapdev

import (
	"sync"
	"sync/atomic"
	"time"

	"hostd/dataplane/repo"
)

// LatencyBuckets are the upper bounds, in seconds, of the latency
// histograms (Prometheus "le" buckets; +Inf is implied).
var LatencyBuckets = [...]float64{25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1}

type histogram struct {
	counts [len(LatencyBuckets) + 1]atomic.Uint64
	sumNs  atomic.Uint64
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(LatencyBuckets) && s > LatencyBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(uint64(d.Nanoseconds()))
}

// Histogram is a latency histogram in Prometheus form: Counts[i] is the
// number of operations that took at most Bounds[i] seconds (cumulative);
// the last count, for +Inf, equals Count.
type Histogram struct {
	Bounds []float64 `json:"le"`
	Counts []uint64  `json:"counts"`
	Count  uint64    `json:"count"`
	Sum    float64   `json:"sum_seconds"`
}

func (h *histogram) snapshot() Histogram {
	out := Histogram{Bounds: LatencyBuckets[:], Counts: make([]uint64, len(h.counts))}
	var c uint64
	for i := range h.counts {
		c += h.counts[i].Load()
		out.Counts[i] = c
	}
	out.Count = c
	out.Sum = float64(h.sumNs.Load()) / 1e9
	return out
}

type stats struct {
	reads, writes, trims, flushes, errors atomic.Uint64
	readBytes, writeBytes                 atomic.Uint64
	pagesRemote, pagesLocal, pagesQueue   atomic.Uint64 // pages read from each place
	remoteErrors, reclaimed               atomic.Uint64

	remote, local atomic.Int64      // pages placed now
	perRepo       [100]atomic.Int64 // pages placed now, per repository

	readLat, writeLat histogram

	rateMu   sync.Mutex
	rateAt   time.Time
	rateOps  uint64
	lastRate float64
}

func (s *stats) init() { s.rateAt = time.Now() }

func (s *stats) count(e entry, delta int64) {
	switch {
	case e.repo != noRepo:
		s.remote.Add(delta)
		s.perRepo[e.repo].Add(delta)
	case e.data:
		s.local.Add(delta)
	}
}

func (s *stats) op(ops, bytes *atomic.Uint64, n int, lat *histogram, start time.Time, err error) {
	ops.Add(1)
	if err != nil {
		s.errors.Add(1)
		return
	}
	bytes.Add(uint64(n))
	lat.observe(time.Since(start))
}

// rate is reads+writes per second over the last window of at least 10 s
// (since Open until then).
func (s *stats) rate(ops uint64) float64 {
	s.rateMu.Lock()
	defer s.rateMu.Unlock()
	el := time.Since(s.rateAt)
	if el <= 0 {
		return s.lastRate
	}
	r := float64(ops-s.rateOps) / el.Seconds()
	if el >= 10*time.Second {
		s.rateAt, s.rateOps, s.lastRate = time.Now(), ops, r
		return r
	}
	if s.lastRate == 0 {
		return r
	}
	return s.lastRate
}

// RepoStatus is one repository as this device sees it.
type RepoStatus struct {
	repo.LinkStatus
	// Pages of this device placed there.
	Pages int64 `json:"pages"`
}

// Stats are a device's counters. Page counts are 4 KiB pages.
type Stats struct {
	Size int64 `json:"size"`
	// PagesRemote are in a repository (and on the local disk, or on their
	// way there); PagesLocalOnly only on the local disk; PagesQueued are
	// waiting for the local disk (and held in memory until then).
	PagesRemote    int64 `json:"pages_remote"`
	PagesLocalOnly int64 `json:"pages_local_only"`
	PagesQueued    int64 `json:"pages_queued"`
	QueueBytes     int64 `json:"queue_bytes"`

	ReadOps    uint64 `json:"read_ops"`
	WriteOps   uint64 `json:"write_ops"`
	TrimOps    uint64 `json:"trim_ops"`
	FlushOps   uint64 `json:"flush_ops"`
	ReadBytes  uint64 `json:"read_bytes"`
	WriteBytes uint64 `json:"write_bytes"`
	Errors     uint64 `json:"errors"`
	// Where read pages came from.
	PagesReadRemote uint64 `json:"pages_read_remote"`
	PagesReadLocal  uint64 `json:"pages_read_local"`
	PagesReadQueue  uint64 `json:"pages_read_queue"`
	// RepoErrors counts failed repository calls (each fell back to the
	// local copy); ReclaimedPages pages given back on request.
	RepoErrors     uint64 `json:"repo_errors"`
	ReclaimedPages uint64 `json:"reclaimed_pages"`
	// OpsPerSec is reads+writes per second over the last >= 10 s.
	OpsPerSec    float64      `json:"ops_per_sec"`
	ReadLatency  Histogram    `json:"read_latency"`
	WriteLatency Histogram    `json:"write_latency"`
	Repos        []RepoStatus `json:"repos"`
	// LocalError is the local file's failure, if any: the device then
	// refuses writes.
	LocalError string `json:"local_error,omitempty"`
}

// Stats reports the device's counters and its repositories' health.
func (d *Device) Stats() Stats {
	s := &d.st
	_, qb := d.q.queued()
	st := Stats{
		Size: d.cfg.Size, PagesRemote: s.remote.Load(), PagesLocalOnly: s.local.Load(), PagesQueued: int64(d.pending.len()), QueueBytes: qb,
		ReadOps: s.reads.Load(), WriteOps: s.writes.Load(), TrimOps: s.trims.Load(), FlushOps: s.flushes.Load(),
		ReadBytes: s.readBytes.Load(), WriteBytes: s.writeBytes.Load(), Errors: s.errors.Load(),
		PagesReadRemote: s.pagesRemote.Load(), PagesReadLocal: s.pagesLocal.Load(), PagesReadQueue: s.pagesQueue.Load(),
		RepoErrors: s.remoteErrors.Load(), ReclaimedPages: s.reclaimed.Load(),
		ReadLatency: s.readLat.snapshot(), WriteLatency: s.writeLat.snapshot(),
	}
	st.OpsPerSec = s.rate(st.ReadOps + st.WriteOps)
	for i, c := range d.repos {
		st.Repos = append(st.Repos, RepoStatus{LinkStatus: c.Status(), Pages: s.perRepo[i].Load()})
	}
	if err := d.q.failed(); err != nil {
		st.LocalError = err.Error()
	}
	return st
}
