package protect

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"hostd/checkpoint/memserver"
	"hostd/hostd/config"
	"hostd/hostd/vm"
	"hostd/xen"
)

// SlotStatus is one configured shape of warm slot, for GET /v1/host.
type SlotStatus struct {
	MemoryMiB uint64 `json:"memory_mib"`
	VCPUs     int    `json:"vcpus"`
	Count     int    `json:"count"`   // configured
	Ready     int    `json:"ready"`   // warm now: a restore of this shape takes one
	Filling   int    `json:"filling"` // being started
	Claims    int64  `json:"claims"`  // restores that took one since hostd started
	// LastError is the last failure to start a slot of this shape (retried
	// with backoff).
	LastError string `json:"last_error,omitempty"`
}

type shape struct {
	mib   uint64
	vcpus int
}

// slots keeps the host's warm slots: per configured shape, paused
// "-incoming defer" domains on memory servers started empty, so that a
// restore only loads the device state and resumes (SpotCheck reserves
// slots on the servers it rents for the same reason: starting QEMU costs
// more than the whole resumption should). They live only as long as
// hostd: removed at its stop, and a new hostd removes what a killed one
// left before starting its own (a slot holds no guest, so nothing is lost).
type slots struct {
	vms *vm.Manager
	mem *Memories
	log *slog.Logger

	mu     sync.Mutex
	ctx    context.Context // set by start: the daemon's lifetime
	shapes []config.WarmSlot
	ready  map[shape][]xen.DomainSpec
	state  map[shape]*SlotStatus
	wg     sync.WaitGroup
}

func newSlots(cfg config.Config, vms *vm.Manager, mem *Memories, log *slog.Logger) *slots {
	s := &slots{vms: vms, mem: mem, log: log.With("component", "slots"), shapes: cfg.Restore.WarmSlots,
		ready: map[shape][]xen.DomainSpec{}, state: map[shape]*SlotStatus{}}
	for _, w := range cfg.Restore.WarmSlots {
		s.state[shape{w.MemoryMiB, w.VCPUs}] = &SlotStatus{MemoryMiB: w.MemoryMiB, VCPUs: w.VCPUs, Count: w.Count}
	}
	return s
}

// start removes a previous daemon's slots, then fills every shape in the
// background until ctx ends.
func (s *slots) start(ctx context.Context) {
	s.mu.Lock()
	s.ctx = ctx
	s.mu.Unlock()
	left, err := s.vms.LeftoverSlots(ctx)
	if err != nil {
		s.log.Warn("find the slots a previous hostd left", "err", err)
	}
	for _, name := range left {
		s.log.Info("removing a previous hostd's warm slot", "slot", name)
		s.remove(ctx, name)
	}
	for sh := range s.state {
		s.fill(sh)
	}
}

// fill starts slots of shape sh in the background until it has its count.
func (s *slots) fill(sh shape) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.state[sh]
	if s.ctx == nil || s.ctx.Err() != nil || st == nil || st.Filling > 0 || len(s.ready[sh]) >= st.Count {
		return
	}
	st.Filling++
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		backoff := 5 * time.Second
		for {
			s.mu.Lock()
			need := len(s.ready[sh]) < st.Count
			if !need || s.ctx.Err() != nil {
				st.Filling--
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
			spec, err := s.create(s.ctx, sh)
			s.mu.Lock()
			if err == nil {
				s.ready[sh] = append(s.ready[sh], spec)
				st.LastError = ""
				backoff = 5 * time.Second
			} else if s.ctx.Err() == nil {
				st.LastError = err.Error()
			}
			s.mu.Unlock()
			if err != nil {
				s.log.Warn("start warm slot; retrying", "memory_mib", sh.mib, "vcpus", sh.vcpus, "err", err, "in", backoff)
				select {
				case <-s.ctx.Done():
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, 5*time.Minute)
			}
		}
	}()
}

// create starts one slot: an empty memory server, then the paused domain
// on its file. On failure nothing of it is left.
func (s *slots) create(ctx context.Context, sh shape) (xen.DomainSpec, error) {
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := fmt.Sprintf("%s%dm.%dc.%s", vm.SlotPrefix, sh.mib, sh.vcpus, hex.EncodeToString(b[:]))
	t0 := time.Now()
	ramPath, err := s.mem.serve(ctx, memserver.Config{VM: name, Size: int64(sh.mib) << 20, Slot: true})
	if err != nil {
		s.remove(ctx, name)
		return xen.DomainSpec{}, fmt.Errorf("warm slot %s: %w", name, err)
	}
	spec, err := s.vms.SlotSpec(name, sh.mib, sh.vcpus, ramPath)
	if err == nil {
		err = s.vms.StartSlot(ctx, spec)
	}
	if err != nil {
		s.remove(ctx, name)
		return xen.DomainSpec{}, err
	}
	s.log.Info("warm slot ready", "slot", name, "memory_mib", sh.mib, "vcpus", sh.vcpus, "ms", time.Since(t0).Milliseconds())
	return spec, nil
}

// take hands out a ready slot the saved VM fits, or says why there is none.
func (s *slots) take(saved xen.DomainSpec) (xen.DomainSpec, string) {
	sh := shape{saved.MemoryMiB, saved.VCPUs}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.state[sh]
	if st == nil {
		return xen.DomainSpec{}, fmt.Sprintf("no warm slots of %d MiB and %d vCPUs are configured", sh.mib, sh.vcpus)
	}
	ready := s.ready[sh]
	if len(ready) == 0 {
		return xen.DomainSpec{}, fmt.Sprintf("no warm slot of %d MiB and %d vCPUs is ready (%d being started)", sh.mib, sh.vcpus, st.Filling)
	}
	spec := ready[len(ready)-1]
	if why := s.vms.SlotFits(saved, spec); why != "" {
		return xen.DomainSpec{}, "the saved VM does not fit the warm slot: " + why
	}
	s.ready[sh] = ready[:len(ready)-1]
	st.Claims++
	return spec, ""
}

// refill starts replacing the slots taken of the saved VM's shape.
func (s *slots) refill(saved xen.DomainSpec) { s.fill(shape{saved.MemoryMiB, saved.VCPUs}) }

// remove stops a slot's domain, then its memory server, then removes its
// files; each step tolerates what is already gone.
func (s *slots) remove(ctx context.Context, name string) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	s.vms.RemoveSlotDomain(cctx, name)
	if err := s.mem.Release(cctx, name); err != nil {
		s.log.Warn("stop a warm slot's memory server", "slot", name, "err", err)
		return // its mount may still be live: keep the directory
	}
	s.vms.RemoveFiles(name)
}

// stop waits for the fillers (ctx has ended) and removes the ready slots.
func (s *slots) stop() {
	s.wg.Wait()
	s.mu.Lock()
	var all []string
	for sh, specs := range s.ready {
		for _, sp := range specs {
			all = append(all, sp.Name)
		}
		delete(s.ready, sh)
	}
	s.mu.Unlock()
	for _, n := range all {
		s.remove(context.Background(), n)
	}
}

// status reports every configured shape.
func (s *slots) status() []SlotStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]SlotStatus, 0, len(s.shapes))
	for _, w := range s.shapes {
		sh := shape{w.MemoryMiB, w.VCPUs}
		st := *s.state[sh]
		st.Ready = len(s.ready[sh])
		out = append(out, st)
	}
	return out
}
