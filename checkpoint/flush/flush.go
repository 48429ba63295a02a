package flush

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// ErrImpossible: no dirty cap can meet the bound at this bandwidth (the
// fixed costs alone exceed T, or the cap would fall below the minimum).
var ErrImpossible = errors.New("time bound cannot be met")

// Params are one VM's bound and cost estimates.
type Params struct {
	Bound      time.Duration // T
	Pause      time.Duration // pausing the vCPUs
	State      time.Duration // saving device state, besides sending it
	StateBytes int64         // device-state size, sent at B
	Commit     time.Duration // final commit: round trip + the backup's fsync
	// Safety in (0, 1] is the share of the computed budget used: room for
	// bandwidth dips and estimate errors.
	Safety float64
	// MinCap is the smallest cap that still works (memfs needs its queue
	// plus room for dirty pages); MaxCap the largest useful one (the
	// guest's RAM: more can never be dirty).
	MinCap, MaxCap int64
	// NoticeTighten in (0, 1] scales the cap once a termination notice
	// arrived; default 0.25.
	NoticeTighten float64
}

// Validate checks the parameters themselves.
func (p Params) Validate() error {
	switch {
	case p.Bound <= 0:
		return fmt.Errorf("flush params: bound %v not positive: %w", p.Bound, ErrImpossible)
	case p.Pause < 0 || p.State < 0 || p.Commit < 0 || p.StateBytes < 0:
		return fmt.Errorf("flush params: negative cost estimate")
	case !(p.Safety > 0 && p.Safety <= 1):
		return fmt.Errorf("flush params: safety %v not in (0, 1]", p.Safety)
	case p.MinCap <= 0 || p.MaxCap < p.MinCap:
		return fmt.Errorf("flush params: caps min %d max %d", p.MinCap, p.MaxCap)
	case p.NoticeTighten < 0 || p.NoticeTighten > 1:
		return fmt.Errorf("flush params: notice tightening %v not in (0, 1]", p.NoticeTighten)
	}
	return nil
}

// fixed is the part of an evacuation that does not depend on dirty memory.
func (p Params) fixed(bw float64) time.Duration {
	return p.Pause + p.State + p.Commit + seconds(float64(p.StateBytes)/bw)
}

func seconds(s float64) time.Duration {
	if s > float64(math.MaxInt64)/1e9 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(s * 1e9)
}

// CapFor derives the dirty cap for bound T at bandwidth bw (bytes/s). It
// returns ErrImpossible, with the numbers, if the fixed costs use up T or
// the cap falls under MinCap; a cap above MaxCap is clipped.
func (p Params) CapFor(bound time.Duration, bw float64) (int64, error) {
	if err := p.Validate(); err != nil {
		return 0, err
	}
	if !(bw > 0) || math.IsInf(bw, 0) {
		return 0, fmt.Errorf("dirty cap: bandwidth %v B/s: %w", bw, ErrImpossible)
	}
	budget := bound - p.fixed(bw)
	if budget <= 0 {
		return 0, fmt.Errorf("dirty cap: bound %v, fixed costs %v at %.1f MB/s leave nothing to flush: %w", bound, p.fixed(bw), bw/1e6, ErrImpossible)
	}
	d := budget.Seconds() * bw * p.Safety
	if d < float64(p.MinCap) {
		return 0, fmt.Errorf("dirty cap: %.0f bytes (%v at %.1f MB/s) under the minimum %d: %w", d, budget, bw/1e6, p.MinCap, ErrImpossible)
	}
	if d > float64(p.MaxCap) {
		return p.MaxCap, nil
	}
	return int64(d), nil
}

// Evacuation predicts the time to evacuate with dirty bytes unflushed.
func (p Params) Evacuation(dirty int64, bw float64) time.Duration {
	if !(bw > 0) {
		return time.Duration(math.MaxInt64)
	}
	return p.fixed(bw) + seconds(float64(dirty)/bw)
}

// CapSetter applies a cap: memfs.FS.SetDirtyCap.
type CapSetter interface {
	SetDirtyCap(bytes int64) error
}

// Controller keeps one VM's cap in line with its bandwidth and deadline.
// Safe for concurrent use.
type Controller struct {
	p   Params
	set CapSetter

	mu       sync.Mutex
	bw       float64 // smoothed bandwidth
	cap      int64
	deadline time.Time // zero: no notice
	err      error     // last derivation failure
}

// NewController applies the cap for an initial bandwidth estimate.
func NewController(p Params, set CapSetter, bw float64) (*Controller, error) {
	if p.NoticeTighten == 0 {
		p.NoticeTighten = 0.25
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	c := &Controller{p: p, set: set, bw: bw}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.applyLocked(time.Time{}, true); err != nil {
		return nil, err
	}
	return c, nil
}

// ObserveBandwidth folds a bandwidth sample (bytes/s) into the estimate and
// re-derives the cap. A drop applies at once: the guarantee depends on it.
// A rise applies once it is worth a sysfs write (over 10 %).
func (c *Controller) ObserveBandwidth(now time.Time, sample float64) error {
	if !(sample >= 0) || math.IsInf(sample, 0) {
		return fmt.Errorf("observe bandwidth: sample %v B/s", sample)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// Smooth rises, but follow drops immediately: overestimating B breaks
	// the bound, underestimating only costs guest speed.
	if sample < c.bw {
		c.bw = sample
	} else {
		c.bw = 0.7*c.bw + 0.3*sample
	}
	return c.applyLocked(now, false)
}

// Notice records a termination notice: from now on the bound is the time
// left until deadline (if shorter than T), and the cap is tightened so the
// final flush is short.
func (c *Controller) Notice(now, deadline time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !deadline.After(now) {
		return fmt.Errorf("termination notice: deadline %v not after now %v: %w", deadline, now, ErrImpossible)
	}
	c.deadline = deadline
	return c.applyLocked(now, true)
}

// ClearNotice withdraws a notice (a drill ended, the VM runs on): the cap
// goes back to what the bound alone allows.
func (c *Controller) ClearNotice(now time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = time.Time{}
	return c.applyLocked(now, true)
}

// Tick re-derives the cap as a notice's deadline approaches.
func (c *Controller) Tick(now time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.deadline.IsZero() {
		return nil
	}
	return c.applyLocked(now, false)
}

func (c *Controller) boundLocked(now time.Time) time.Duration {
	b := c.p.Bound
	if !c.deadline.IsZero() {
		b = min(b, c.deadline.Sub(now))
	}
	return b
}

func (c *Controller) applyLocked(now time.Time, force bool) error {
	d, err := c.p.CapFor(c.boundLocked(now), c.bw)
	if err == nil && !c.deadline.IsZero() {
		d = max(int64(float64(d)*c.p.NoticeTighten), c.p.MinCap)
	}
	if err != nil {
		// Hold the guest as tightly as memfs allows: it cannot be made
		// safe, but it can be made as close to safe as possible.
		c.err = err
		d = c.p.MinCap
	} else {
		c.err = nil
	}
	if force || d < c.cap || float64(d) > 1.1*float64(c.cap) {
		if serr := c.set.SetDirtyCap(d); serr != nil {
			return fmt.Errorf("apply dirty cap %d: %w", d, serr)
		}
		c.cap = d
	}
	return err
}

// State is a snapshot for metrics and the scheduler.
type State struct {
	Bandwidth float64       // bytes/s, smoothed
	Cap       int64         // bytes, as applied
	Bound     time.Duration // current bound (shrinks after a notice)
	Notice    bool
	// Headroom is Bound minus the predicted evacuation time with Dirty
	// bytes unflushed; negative means the bound would be missed.
	Headroom time.Duration
	Err      error // why the bound cannot be met, if so
}

// State reports the controller's view with dirty bytes currently unflushed
// (memfs: bdi dirty + queue).
func (c *Controller) State(now time.Time, dirty int64) State {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.boundLocked(now)
	return State{
		Bandwidth: c.bw, Cap: c.cap, Bound: b, Notice: !c.deadline.IsZero(),
		Headroom: b - c.p.Evacuation(dirty, c.bw), Err: c.err,
	}
}
