package overload

import (
	"math"
	"testing"
	"time"
)

const tick = 10 * time.Second

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// feeder drives a policy with synthetic 10-s intervals.
type feeder struct {
	t   *testing.T
	p   *Policy
	now time.Time
	all []Event
}

func newFeeder(t *testing.T, cfg Config) *feeder { return &feeder{t: t, p: New(cfg), now: t0} }

// run feeds one interval per rate (ops/s) and returns the events.
func (f *feeder) run(rates ...float64) []Event {
	f.t.Helper()
	var evs []Event
	for _, r := range rates {
		f.now = f.now.Add(tick)
		e, err := f.p.Observe(Sample{At: f.now, Interval: tick, Ops: uint64(r * tick.Seconds())})
		if err != nil {
			f.t.Fatal(err)
		}
		evs = append(evs, e...)
	}
	f.all = append(f.all, evs...)
	return evs
}

func repeat(r float64, n int) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = r
	}
	return s
}

func kinds(evs []Event) []Kind {
	var k []Kind
	for _, e := range evs {
		k = append(k, e.Kind)
	}
	return k
}

func want(t *testing.T, evs []Event, k ...Kind) {
	t.Helper()
	got := kinds(evs)
	if len(got) != len(k) {
		t.Fatalf("events %v, want %v", got, k)
	}
	for i := range k {
		if got[i] != k[i] {
			t.Fatalf("events %v, want %v", got, k)
		}
	}
}

func TestQuietNeverOverloads(t *testing.T) {
	f := newFeeder(t, Config{})
	want(t, f.run(0, 50, 200, 199, 200)) // 200 ops/s is not above the line
	if f.p.Overloaded() {
		t.Fatal("overloaded at or below 200 ops/s")
	}
}

func TestTransientBurst(t *testing.T) {
	f := newFeeder(t, Config{})
	evs := f.run(0, 300, 500, 0, 0)
	want(t, evs, Started, TransientEnded)
	s, e := evs[0], evs[1]
	if !s.Start.Equal(t0.Add(tick)) || s.Rate != 300 {
		t.Errorf("started %+v", s)
	}
	if e.Duration != 20*time.Second || e.PeakRate != 500 || e.MeanRate != 400 {
		t.Errorf("ended %+v, want 20 s, peak 500, mean 400", e)
	}
	if f.p.Transients() != 1 {
		t.Errorf("%d transients learned", f.p.Transients())
	}
}

// TestContinuousOverloadBecomesSustained: 8 overloaded intervals of 12 come
// before the 120-s threshold.
func TestContinuousOverloadBecomesSustained(t *testing.T) {
	f := newFeeder(t, Config{})
	evs := f.run(repeat(1000, 7)...)
	want(t, evs, Started)
	evs = f.run(1000)
	want(t, evs, Sustained)
	if e := evs[0]; e.Reason != ReasonWindow || e.Duration != 80*time.Second || e.Overloaded != 8 || e.Threshold != 120*time.Second {
		t.Errorf("sustained %+v", e)
	}
	want(t, f.run(repeat(1000, 10)...)) // reported once
	evs = f.run(0)
	want(t, evs, SustainedEnded)
	if evs[0].Duration != 180*time.Second {
		t.Errorf("sustained overload lasted %v, want 180 s", evs[0].Duration)
	}
	if f.p.Transients() != 0 {
		t.Error("a sustained overload was learned as transient")
	}
}

// TestOscillationIsSustained: short overloads that keep coming fill the
// window even though none lasts.
func TestOscillationIsSustained(t *testing.T) {
	f := newFeeder(t, Config{})
	var rates []float64
	for range 4 {
		rates = append(rates, 400, 400, 0)
	}
	f.run(rates...)
	var sus []Event
	for _, e := range f.all {
		if e.Kind == Sustained {
			sus = append(sus, e)
		}
	}
	if len(sus) != 1 || sus[0].Reason != ReasonWindow || sus[0].Duration != 20*time.Second {
		t.Fatalf("events %v, want one window-sustained overload of 20 s", kinds(f.all))
	}
	if !sus[0].At.Equal(t0.Add(11 * tick)) {
		t.Errorf("sustained at %v, want the 11th interval", sus[0].At.Sub(t0))
	}
}

// TestAdaptiveThreshold: after MinSamples transient overloads the threshold
// is mean + 3 sigma of their durations, and a long overload is declared
// sustained once it outlasts it, before the window would.
func TestAdaptiveThreshold(t *testing.T) {
	f := newFeeder(t, Config{})
	for _, n := range []int{1, 2, 1, 2, 1} { // 10, 20, 10, 20, 10 s
		f.run(repeat(600, n)...)
		f.run(repeat(0, 12)...) // clear the window
	}
	if f.p.Transients() != 5 {
		t.Fatalf("%d transients", f.p.Transients())
	}
	mean := 14.0
	sigma := math.Sqrt((3*16 + 2*36) / 5.0)
	wantT := time.Duration((mean + 3*sigma) * float64(time.Second))
	if d := f.p.Threshold() - wantT; d < -time.Millisecond || d > time.Millisecond {
		t.Fatalf("threshold %v, want %v", f.p.Threshold(), wantT)
	}
	evs := f.run(600, 600)
	want(t, evs, Started)
	evs = f.run(600) // 30 s > 28.7 s
	want(t, evs, Sustained)
	if e := evs[0]; e.Reason != ReasonThreshold || e.Duration != 30*time.Second {
		t.Errorf("sustained %+v", e)
	}

	f.p.Reset()
	if f.p.Threshold() != 120*time.Second || f.p.Transients() != 0 || f.p.Overloaded() {
		t.Fatalf("after reset: threshold %v, %d transients", f.p.Threshold(), f.p.Transients())
	}
}

// TestThresholdNeverAboveInitial: long transients do not raise it.
func TestThresholdNeverAboveInitial(t *testing.T) {
	f := newFeeder(t, Config{Window: 20, Required: 20, InitialThreshold: 60 * time.Second})
	for range 5 {
		f.run(repeat(300, 5)...) // 50 s each, alternating with quiet
		f.run(repeat(0, 20)...)
	}
	if f.p.Threshold() != 50*time.Second {
		t.Fatalf("threshold %v, want 50 s (all transients equal)", f.p.Threshold())
	}
	g := newFeeder(t, Config{Window: 20, Required: 20, InitialThreshold: 40 * time.Second, MinSamples: 1})
	g.run(300, 300, 300, 0) // 30 s
	g.run(repeat(300, 4)...)
	if g.p.Threshold() != 30*time.Second {
		t.Fatalf("threshold %v", g.p.Threshold())
	}
	// 10, 10, 50 s: mean + 3 sigma is 75 s, above the initial 60 s.
	h := newFeeder(t, Config{Window: 20, Required: 20, InitialThreshold: 60 * time.Second, MinSamples: 3})
	for _, n := range []int{1, 1, 5} {
		h.run(repeat(300, n)...)
		h.run(0)
	}
	if h.p.Transients() != 3 || h.p.Threshold() != 60*time.Second {
		t.Fatalf("%d transients, threshold %v, want 3 and the initial 60 s", h.p.Transients(), h.p.Threshold())
	}
}

func TestQuietIntervals(t *testing.T) {
	f := newFeeder(t, Config{QuietIntervals: 2})
	evs := f.run(300, 0, 300, 0, 0)
	want(t, evs, Started, TransientEnded)
	if evs[1].Duration != 30*time.Second {
		t.Errorf("duration %v: a single quiet interval must not split the overload", evs[1].Duration)
	}
}

func TestBadInterval(t *testing.T) {
	p := New(Config{})
	if _, err := p.Observe(Sample{At: t0, Interval: 0, Ops: 5}); err == nil {
		t.Fatal("zero interval accepted")
	}
	// Other interval lengths are rates, not counts.
	evs, _ := p.Observe(Sample{At: t0, Interval: time.Second, Ops: 201})
	want(t, evs, Started)
}
