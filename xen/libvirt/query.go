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

// List returns every domain libvirt knows, running or not, hostd's or not.
func (d *Driver) List(ctx context.Context) ([]xen.DomainInfo, error) {
	var out []xen.DomainInfo
	err := d.call(ctx, "list domains", func(conn *golibvirt.Connect) error {
		doms, err := conn.ListAllDomains(0)
		if err != nil {
			return err
		}
		defer func() {
			for i := range doms {
				doms[i].Free()
			}
		}()
		out = make([]xen.DomainInfo, 0, len(doms))
		for i := range doms {
			info, err := domainInfo(&doms[i])
			if libvirtCode(err) == golibvirt.ERR_NO_DOMAIN {
				continue // undefined while we listed
			}
			if err != nil {
				return err
			}
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
