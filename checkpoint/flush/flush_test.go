package flush

import (
	"errors"
	"testing"
	"time"
)

type capLog struct {
	caps []int64
	fail error
}

func (l *capLog) SetDirtyCap(n int64) error {
	if l.fail != nil {
		return l.fail
	}
	l.caps = append(l.caps, n)
	return nil
}

func params() Params {
	return Params{
		Bound: 30 * time.Second, Pause: 100 * time.Millisecond, State: 200 * time.Millisecond,
		StateBytes: 1 << 20, Commit: 200 * time.Millisecond, Safety: 0.8,
		MinCap: 8 << 20, MaxCap: 4 << 30,
	}
}

func TestCapArithmetic(t *testing.T) {
	p := params()
	bw := 100e6 // 100 MB/s
	// fixed = 0.1 + 0.2 + 0.2 + 1 MiB/100 MB/s (10.48576 ms)
	fixed := 500*time.Millisecond + 10485760*time.Nanosecond
	want := int64((30*time.Second - fixed).Seconds() * bw * 0.8)
	got, err := p.CapFor(p.Bound, bw)
	if err != nil || got != want {
		t.Fatalf("cap %d %v, want %d", got, err, want)
	}
	// At the cap, the predicted evacuation fits the bound with the safety
	// margin left over.
	ev := p.Evacuation(got, bw)
	if ev > p.Bound || ev < p.Bound*8/10 {
		t.Fatalf("evacuation at cap %v, bound %v", ev, p.Bound)
	}
	// Clipped at MaxCap.
	if c, _ := p.CapFor(p.Bound, 10e9); c != p.MaxCap {
		t.Fatalf("cap at 10 GB/s %d, want MaxCap", c)
	}
}

func TestImpossibleBounds(t *testing.T) {
	p := params()
	cases := map[string]func() (int64, error){
		"fixed costs exceed T": func() (int64, error) { return p.CapFor(400*time.Millisecond, 100e6) },
		"cap under minimum":    func() (int64, error) { return p.CapFor(700*time.Millisecond, 10e6) },
		"zero bandwidth":       func() (int64, error) { return p.CapFor(p.Bound, 0) },
		"negative bound":       func() (int64, error) { return p.CapFor(-time.Second, 100e6) },
	}
	for name, f := range cases {
		if _, err := f(); !errors.Is(err, ErrImpossible) {
			t.Errorf("%s: %v", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	bad := p
	bad.Safety = 1.5
	if err := bad.Validate(); err == nil {
		t.Fatal("safety 1.5 accepted")
	}
	bad = p
	bad.MaxCap = 1
	if err := bad.Validate(); err == nil {
		t.Fatal("max cap under min cap accepted")
	}
}

func TestControllerFollowsBandwidth(t *testing.T) {
	now := time.Unix(1000, 0)
	log := &capLog{}
	c, err := NewController(params(), log, 100e6)
	if err != nil {
		t.Fatal(err)
	}
	first := log.caps[0]
	// A drop applies at once, fully.
	if err := c.ObserveBandwidth(now, 50e6); err != nil {
		t.Fatal(err)
	}
	if got := log.caps[len(log.caps)-1]; got >= first*6/10 {
		t.Fatalf("cap after halving bandwidth %d, before %d", got, first)
	}
	n := len(log.caps)
	// A small rise changes nothing; repeated rises converge upwards.
	c.ObserveBandwidth(now, 52e6)
	if len(log.caps) != n {
		t.Fatal("a 4 % rise rewrote the cap")
	}
	for i := 0; i < 20; i++ {
		c.ObserveBandwidth(now, 100e6)
	}
	if got := log.caps[len(log.caps)-1]; got < first*8/10 || got > first {
		t.Fatalf("cap after recovery %d, original %d", got, first)
	}
	// Bandwidth collapse: the bound cannot be met; the cap goes to the
	// minimum and the state says why.
	if err := c.ObserveBandwidth(now, 1e5); !errors.Is(err, ErrImpossible) {
		t.Fatalf("collapse: %v", err)
	}
	if got := log.caps[len(log.caps)-1]; got != params().MinCap {
		t.Fatalf("cap after collapse %d", got)
	}
	st := c.State(now, 64<<20)
	if st.Err == nil || st.Headroom >= 0 {
		t.Fatalf("state after collapse %+v", st)
	}
	if _, err := NewController(params(), &capLog{fail: errors.New("sysfs gone")}, 100e6); err == nil {
		t.Fatal("setter failure hidden")
	}
	if err := c.ObserveBandwidth(now, -1); err == nil {
		t.Fatal("negative bandwidth accepted")
	}
}

func TestNoticeTightens(t *testing.T) {
	now := time.Unix(1000, 0)
	log := &capLog{}
	c, _ := NewController(params(), log, 100e6)
	before := c.State(now, 0)
	if err := c.Notice(now, now.Add(20*time.Second)); err != nil {
		t.Fatal(err)
	}
	after := c.State(now, 0)
	if !after.Notice || after.Bound != 20*time.Second || after.Cap >= before.Cap/4 {
		t.Fatalf("after notice %+v, before %+v", after, before)
	}
	// As the deadline nears the cap keeps shrinking.
	c.Tick(now.Add(15 * time.Second))
	later := c.State(now.Add(15*time.Second), 0)
	if later.Cap >= after.Cap || later.Bound != 5*time.Second {
		t.Fatalf("tick: %+v after %+v", later, after)
	}
	if later.Headroom <= 0 {
		t.Fatalf("headroom with nothing dirty %v", later.Headroom)
	}
	if err := c.Notice(now, now.Add(-time.Second)); !errors.Is(err, ErrImpossible) {
		t.Fatalf("past deadline: %v", err)
	}
}
