package protect

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"hostd/hostd/config"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/store"
	"hostd/hostd/vm"
	"hostd/xen/xentest"
)

// Evacuations, epoch pauses and resumes are exported as distributions (a
// scrape sees every observation, not the last one), beside the per-VM
// gauges, and the collector registers without clashing with them.
func TestHistogramsAreExported(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	cfg.StateDir, cfg.RunDir = filepath.Join(dir, "state"), filepath.Join(dir, "run")
	st, err := store.Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ev := events.NewBroker()
	jm, _ := jobs.NewManager(st, ev, log)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hv := xentest.New()
	vms := vm.NewManager(ctx, cfg, hv, st, ev, jm, log)
	m := NewManager(ctx, cfg, hv, vms, NewMemories(cfg, "/nonexistent/hostd", log), st, ev, jm, log)
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(m), vm.NewCollector(vms))

	for _, p := range []float64{0.05, 0.08, 0.2} {
		m.hist.epochPause.Observe(p)
	}
	m.hist.evacuation.WithLabelValues("true").Observe(1.5)
	m.hist.evacuation.WithLabelValues("false").Observe(40)
	m.hist.resume.WithLabelValues("warm").Observe(0.2)

	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			if h := mt.GetHistogram(); h != nil {
				counts[f.GetName()] += h.GetSampleCount()
			}
		}
	}
	want := map[string]uint64{"hostd_protection_epoch_pause_seconds": 3, "hostd_evacuation_seconds": 2, "hostd_restore_resume_seconds": 1}
	for name, n := range want {
		if counts[name] != n {
			t.Errorf("%s: %d observations exported, want %d (all: %v)", name, counts[name], n, counts)
		}
	}
}
