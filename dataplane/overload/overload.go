package overload

import (
	"fmt"
	"math"
	"time"
)

// Config tunes a Policy; zero fields take the defaults in brackets.
type Config struct {
	RateThreshold    float64       // ops/s above which an interval is overloaded [200]
	Window           int           // sliding window, in intervals [12]
	Required         int           // overloaded intervals in the window that make it sustained [8]
	InitialThreshold time.Duration // migration threshold before learning [120 s]
	MinSamples       int           // transient durations needed to adapt the threshold [5]
	QuietIntervals   int           // non-overloaded intervals in a row that end an overload [1]
}

func (c Config) withDefaults() Config {
	if c.RateThreshold <= 0 {
		c.RateThreshold = 200
	}
	if c.Window <= 0 {
		c.Window = 12
	}
	if c.Required <= 0 || c.Required > c.Window {
		c.Required = min(8, c.Window)
	}
	if c.InitialThreshold <= 0 {
		c.InitialThreshold = 120 * time.Second
	}
	if c.MinSamples <= 0 {
		c.MinSamples = 5
	}
	if c.QuietIntervals <= 0 {
		c.QuietIntervals = 1
	}
	return c
}

// Sample is the swap operations of one interval that ended At.
type Sample struct {
	At       time.Time
	Interval time.Duration
	Ops      uint64
}

// Kind is an event type, as published on hostd's event stream.
type Kind string

const (
	Started         Kind = "overload_started"
	TransientEnded  Kind = "overload_transient_ended"
	Sustained       Kind = "overload_sustained" // migration recommended
	SustainedEnded  Kind = "overload_sustained_ended"
	ReasonWindow         = "window"   // Required of the last Window intervals
	ReasonThreshold      = "duration" // outlasted the migration threshold
)

// Event is a change in a VM's overload state.
type Event struct {
	Kind Kind      `json:"kind"`
	At   time.Time `json:"at"`
	// Start of the overload (the beginning of its first overloaded
	// interval).
	Start time.Time `json:"start"`
	// Duration of the overload so far (Started, Sustained) or in all
	// (ended events): from Start to the end of its last overloaded
	// interval.
	Duration time.Duration `json:"duration"`
	// Rate is this interval's ops/s; MeanRate and PeakRate cover the
	// overloaded intervals of the overload.
	Rate     float64 `json:"rate"`
	MeanRate float64 `json:"mean_rate"`
	PeakRate float64 `json:"peak_rate"`
	// Threshold is the migration threshold in force.
	Threshold time.Duration `json:"threshold"`
	// Reason of a Sustained event: ReasonWindow or ReasonThreshold.
	Reason string `json:"reason,omitempty"`
	// Overloaded is how many of the last Window intervals were.
	Overloaded int `json:"overloaded_intervals"`
}

// Policy is one VM's overload state. Not safe for concurrent use.
type Policy struct {
	cfg    Config
	window []bool // ring of the last Window intervals
	next   int
	filled int

	in        bool // an overload is in progress
	sustained bool
	start     time.Time
	lastOver  time.Time // end of its last overloaded interval
	quiet     int
	sumRate   float64
	nOver     int
	peak      float64

	transients []time.Duration
}

// New makes a policy.
func New(cfg Config) *Policy {
	cfg = cfg.withDefaults()
	return &Policy{cfg: cfg, window: make([]bool, cfg.Window)}
}

// Config is the configuration in force (defaults filled in).
func (p *Policy) Config() Config { return p.cfg }

// Threshold is the current migration threshold: InitialThreshold, or mean
// + 3 sigma of the past transient overload durations once there are
// MinSamples of them, whichever is lower.
func (p *Policy) Threshold() time.Duration {
	n := len(p.transients)
	if n < p.cfg.MinSamples {
		return p.cfg.InitialThreshold
	}
	var sum float64
	for _, d := range p.transients {
		sum += d.Seconds()
	}
	mean := sum / float64(n)
	var ss float64
	for _, d := range p.transients {
		ss += (d.Seconds() - mean) * (d.Seconds() - mean)
	}
	sigma := math.Sqrt(ss / float64(n))
	t := time.Duration((mean + 3*sigma) * float64(time.Second))
	return min(t, p.cfg.InitialThreshold)
}

// Transients is the number of transient overload durations learned since
// the last Reset.
func (p *Policy) Transients() int { return len(p.transients) }

// Overloaded says whether an overload is in progress.
func (p *Policy) Overloaded() bool { return p.in }

// Reset forgets everything learned: call it after the VM migrated.
func (p *Policy) Reset() {
	*p = *New(p.cfg)
}

// Observe takes one interval's sample and returns the events it causes,
// in order. A sample with a non-positive interval is an error (a clock
// step): it is ignored.
func (p *Policy) Observe(s Sample) ([]Event, error) {
	if s.Interval <= 0 {
		return nil, fmt.Errorf("overload sample at %v: interval %v is not positive", s.At, s.Interval)
	}
	rate := float64(s.Ops) / s.Interval.Seconds()
	over := rate > p.cfg.RateThreshold

	p.window[p.next] = over
	p.next = (p.next + 1) % len(p.window)
	p.filled = min(p.filled+1, len(p.window))
	count := 0
	for _, o := range p.window {
		if o {
			count++
		}
	}

	var evs []Event
	ev := func(k Kind) Event {
		e := Event{Kind: k, At: s.At, Start: p.start, Duration: p.lastOver.Sub(p.start), Rate: rate, PeakRate: p.peak, Threshold: p.Threshold(), Overloaded: count}
		if p.nOver > 0 {
			e.MeanRate = p.sumRate / float64(p.nOver)
		}
		return e
	}
	if over {
		if !p.in {
			p.in, p.sustained = true, false
			p.start = s.At.Add(-s.Interval)
			p.sumRate, p.nOver, p.peak = 0, 0, 0
		}
		p.quiet = 0
		p.lastOver = s.At
		p.sumRate += rate
		p.nOver++
		p.peak = max(p.peak, rate)
		if p.nOver == 1 {
			evs = append(evs, ev(Started))
		}
	} else if p.in {
		p.quiet++
		if p.quiet >= p.cfg.QuietIntervals {
			p.in = false
			if p.sustained {
				evs = append(evs, ev(SustainedEnded))
			} else {
				e := ev(TransientEnded)
				p.transients = append(p.transients, e.Duration)
				evs = append(evs, e)
			}
			return evs, nil
		}
	}
	if p.in && !p.sustained {
		reason := ""
		switch {
		case count >= p.cfg.Required:
			reason = ReasonWindow
		case p.lastOver.Sub(p.start) > p.Threshold():
			reason = ReasonThreshold
		}
		if reason != "" {
			p.sustained = true
			e := ev(Sustained)
			e.Reason = reason
			evs = append(evs, e)
		}
	}
	return evs, nil
}
