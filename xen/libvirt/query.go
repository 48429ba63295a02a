package libvirt

import (
	"context"
	"fmt"
	"time"

	golibvirt "libvirt.org/go/libvirt"

	"hostd/xen"
)

// Domain returns one domain's identity, state and recorded spec.
func (d *Driver) Domain(ctx context.Context, name string) (xen.DomainInfo, error) {
	var info xen.DomainInfo
	err := d.withDomain(ctx, "read", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		var err error
		info, err = domainInfo(dom)
		return err
	})
	return info, err
}

// List returns every domain libvirt knows, running or not, hostd's or not,
// without their specs. Two calls to libvirtd in all: one for state, vCPUs
// and memory of every domain, one for which of them are persistent. Asking
// per domain instead costs four round trips each (70 ms for 100 domains).
func (d *Driver) List(ctx context.Context) ([]xen.DomainInfo, error) {
	var out []xen.DomainInfo
	err := d.call(ctx, "list domains", func(conn *golibvirt.Connect) error {
		stats, err := conn.GetAllDomainStats(nil,
			golibvirt.DOMAIN_STATS_STATE|golibvirt.DOMAIN_STATS_VCPU|golibvirt.DOMAIN_STATS_BALLOON, 0)
		if err != nil {
			return err
		}
		defer func() {
			for i := range stats {
				stats[i].Domain.Free()
			}
		}()
		persistent, err := conn.ListAllDomains(golibvirt.CONNECT_LIST_DOMAINS_PERSISTENT)
		if err != nil {
			return err
		}
		isPersistent := make(map[string]bool, len(persistent))
		for i := range persistent {
			if u, err := persistent[i].GetUUIDString(); err == nil {
				isPersistent[u] = true
			}
			persistent[i].Free()
		}
		out = make([]xen.DomainInfo, 0, len(stats))
		for _, st := range stats {
			// Name, UUID and ID are cached in the handle: no round trip.
			var info xen.DomainInfo
			if info.Name, err = st.Domain.GetName(); err != nil {
				return err
			}
			if info.UUID, err = st.Domain.GetUUIDString(); err != nil {
				return err
			}
			if id, err := st.Domain.GetID(); err == nil && id != ^uint(0) {
				info.ID = int(id)
			}
			info.State = xen.StateUnknown
			if st.State != nil && st.State.StateSet {
				info.State, info.Reason = stateName(st.State.State, st.State.Reason)
			}
			if info.State == xen.StateShutoff {
				info.ID = 0
			}
			info.VCPUs = len(st.Vcpu)
			if st.Balloon != nil && st.Balloon.MaximumSet {
				info.MemoryMiB = st.Balloon.Maximum / 1024
			}
			info.Persistent = isPersistent[info.UUID]
			out = append(out, info)
		}
		return nil
	})
	return out, err
}

func domainInfo(dom *golibvirt.Domain) (xen.DomainInfo, error) {
	var info xen.DomainInfo
	var err error
	if info.Name, err = dom.GetName(); err != nil {
		return info, err
	}
	if info.UUID, err = dom.GetUUIDString(); err != nil {
		return info, err
	}
	st, reason, err := dom.GetState()
	if err != nil {
		return info, err
	}
	info.State, info.Reason = stateName(st, reason)
	if st != golibvirt.DOMAIN_SHUTOFF {
		if id, err := dom.GetID(); err == nil {
			info.ID = int(id)
		}
	}
	li, err := dom.GetInfo()
	if err != nil {
		return info, err
	}
	info.VCPUs = int(li.NrVirtCpu)
	info.MemoryMiB = li.MaxMem / 1024
	if info.Persistent, err = dom.IsPersistent(); err != nil {
		return info, err
	}
	if info.Spec, err = domainSpec(dom); err != nil {
		return info, err
	}
	return info, nil
}

// Stats samples a running domain. Guest-reported fields stay zero until the
// guest's balloon driver has reported (every BalloonStatsPeriod).
func (d *Driver) Stats(ctx context.Context, name string) (xen.DomainStats, error) {
	var st xen.DomainStats
	err := d.withDomain(ctx, "read stats of", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		active, err := dom.IsActive()
		if err != nil {
			return err
		}
		if !active {
			return fmt.Errorf("%w: it is not running; start it first", xen.ErrState)
		}
		li, err := dom.GetInfo()
		if err != nil {
			return err
		}
		st.CPUTime = time.Duration(li.CpuTime)
		st.MemoryMiB = li.Memory / 1024
		ms, err := dom.MemoryStats(uint32(golibvirt.DOMAIN_MEMORY_STAT_NR), 0)
		if err != nil {
			return err
		}
		for _, m := range ms {
			// libvirt reports memory in KiB, swap traffic in kB too.
			switch golibvirt.DomainMemoryStatTags(m.Tag) {
			case golibvirt.DOMAIN_MEMORY_STAT_ACTUAL_BALLOON:
				st.BalloonMiB = m.Val / 1024
			case golibvirt.DOMAIN_MEMORY_STAT_RSS:
				st.RSSMiB = m.Val / 1024
			case golibvirt.DOMAIN_MEMORY_STAT_UNUSED:
				st.UnusedMiB = m.Val / 1024
			case golibvirt.DOMAIN_MEMORY_STAT_AVAILABLE:
				st.AvailableMiB = m.Val / 1024
			case golibvirt.DOMAIN_MEMORY_STAT_SWAP_IN:
				st.SwapInPages = m.Val / 4
			case golibvirt.DOMAIN_MEMORY_STAT_SWAP_OUT:
				st.SwapOutPages = m.Val / 4
			}
		}
		return nil
	})
	return st, err
}

// SetMemory sets a running domain's balloon target. The guest gives memory
// back (or takes it) at its own pace; Stats shows the effect.
func (d *Driver) SetMemory(ctx context.Context, name string, mib uint64) error {
	return d.withDomain(ctx, "set memory of", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		active, err := dom.IsActive()
		if err != nil {
			return err
		}
		if !active {
			return fmt.Errorf("%w: the balloon works on a running domain only; start it first", xen.ErrState)
		}
		max, err := dom.GetMaxMemory()
		if err != nil {
			return err
		}
		if mib < minMemoryMiB || mib*1024 > max {
			return fmt.Errorf("%w: %d MiB is outside %d..%d MiB (the domain's memory)", xen.ErrInvalidSpec, mib, minMemoryMiB, max/1024)
		}
		return dom.SetMemoryFlags(mib*1024, golibvirt.DOMAIN_MEM_LIVE)
	})
}

// stateName maps libvirt's state and reason numbers to xen's names. The
// reason lists follow libvirt-domain.h's enums, which count from 0
// (unknown); TestStateName checks them against the binding's constants.
func stateName(st golibvirt.DomainState, reason int) (xen.State, string) {
	switch st {
	case golibvirt.DOMAIN_RUNNING, golibvirt.DOMAIN_BLOCKED:
		return xen.StateRunning, pick(reason, "", "booted", "migrated", "restored", "from_snapshot", "unpaused",
			"migration_canceled", "save_canceled", "wakeup", "crashed", "postcopy", "postcopy_failed")
	case golibvirt.DOMAIN_PAUSED:
		return xen.StatePaused, pick(reason, "", "user", "migration", "save", "dump", "ioerror", "watchdog",
			"from_snapshot", "shutting_down", "snapshot", "crashed", "starting_up", "postcopy", "postcopy_failed", "api_error")
	case golibvirt.DOMAIN_SHUTDOWN:
		return xen.StateShutdown, pick(reason, "", "user")
	case golibvirt.DOMAIN_SHUTOFF:
		return xen.StateShutoff, pick(reason, "", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
			"from_snapshot", "daemon")
	case golibvirt.DOMAIN_CRASHED:
		return xen.StateCrashed, pick(reason, "", "panicked")
	case golibvirt.DOMAIN_PMSUSPENDED:
		return xen.StatePMSuspended, ""
	}
	return xen.StateUnknown, ""
}
