package libvirt

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"hostd/xen"
)

// DefaultShutdownTimeout applies when Shutdown is given no timeout.
const DefaultShutdownTimeout = 60 * time.Second

// statePoll is how often Shutdown re-reads the state while it waits.
const statePoll = 200 * time.Millisecond

// Define validates spec and makes it a persistent domain. Nothing is
// defined when it fails.
func (d *Driver) Define(ctx context.Context, spec xen.DomainSpec) error {
	op := fmt.Sprintf("define domain %q", spec.Name)
	if err := validateSpec(spec, d.lim); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	spec, err := normalize(spec)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	doc, err := domainXML(spec, xmlOptions{
		DomainType:         d.domainType(),
		BalloonStatsPeriod: uint(d.cfg.BalloonStatsPeriod / time.Second),
		TapExists:          tapExists,
	})
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	err = d.call(ctx, op, func(conn *golibvirt.Connect) error {
		// libvirt redefines (updates) a domain whose name and UUID match,
		// so an existing name must be refused here, not by libvirt.
		if dom, err := conn.LookupDomainByName(spec.Name); err == nil {
			dom.Free()
			return fmt.Errorf("%w: pick another name or undefine the old domain", xen.ErrExists)
		}
		if dom, err := conn.LookupDomainByUUIDString(spec.UUID); err == nil {
			other, _ := dom.GetName()
			dom.Free()
			return fmt.Errorf("%w: uuid %s is domain %q's; leave uuid empty to get a fresh one", xen.ErrExists, spec.UUID, other)
		}
		dom, err := conn.DomainDefineXMLFlags(doc, golibvirt.DOMAIN_DEFINE_VALIDATE)
		if err != nil {
			return err
		}
		return dom.Free()
	})
	if err != nil {
		return err
	}
	d.log.Info("domain defined", "domain", spec.Name, "uuid", spec.UUID, "accel", d.accel,
		"vcpus", spec.VCPUs, "memory_mib", spec.MemoryMiB, "incoming", spec.Incoming)
	return nil
}

// ClearIncoming rewrites the persistent definition without Incoming. On a
// running domain libvirt keeps the live configuration and applies the new
// one at the next start; the spec is the recorded (normalized) one, so
// UUID, MACs and disk targets stay what they were.
func (d *Driver) ClearIncoming(ctx context.Context, name string) error {
	return d.withDomain(ctx, "clear incoming of", name, func(conn *golibvirt.Connect, dom *golibvirt.Domain) error {
		elem, err := dom.GetMetadata(golibvirt.DOMAIN_METADATA_ELEMENT, MetadataNamespace, golibvirt.DOMAIN_AFFECT_CONFIG)
		if err != nil {
			return err
		}
		spec, err := parseSpecMetadata(elem)
		if err != nil {
			return err
		}
		if spec == nil || !spec.Incoming {
			return nil
		}
		spec.Incoming = false
		doc, err := domainXML(*spec, xmlOptions{
			DomainType:         d.domainType(),
			BalloonStatsPeriod: uint(d.cfg.BalloonStatsPeriod / time.Second),
			TapExists:          tapExists,
		})
		if err != nil {
			return err
		}
		// Same name and UUID: libvirt updates the definition in place.
		nd, err := conn.DomainDefineXMLFlags(doc, golibvirt.DOMAIN_DEFINE_VALIDATE)
		if err != nil {
			return err
		}
		d.log.Info("domain redefined without incoming", "domain", name)
		return nd.Free()
	})
}

// Start boots a defined domain; a domain defined with Incoming starts
// paused, its QEMU waiting for migrate-incoming.
func (d *Driver) Start(ctx context.Context, name string) error {
	return d.withDomain(ctx, "start", name, func(conn *golibvirt.Connect, dom *golibvirt.Domain) error {
		spec, err := domainSpec(dom)
		if err != nil {
			return err
		}
		if spec != nil {
			if err := ramPathFree(conn, name, spec.RAMPath); err != nil {
				return err
			}
		}
		flags := golibvirt.DOMAIN_NONE
		if spec != nil && spec.Incoming {
			// Without it libvirt would "cont" a QEMU that has no state yet.
			flags = golibvirt.DOMAIN_START_PAUSED
		}
		if err := dom.CreateWithFlags(flags); err != nil {
			if libvirtCode(err) == golibvirt.ERR_OPERATION_INVALID {
				// Keep libvirt's reason: "already running" is only one of them.
				return fmt.Errorf("%w: %v", xen.ErrState, err)
			}
			return err
		}
		d.log.Info("domain started", "domain", name, "paused", flags == golibvirt.DOMAIN_START_PAUSED)
		return nil
	})
}

// Shutdown presses the ACPI power button and waits until the domain is off.
// After timeout (DefaultShutdownTimeout if zero) it returns an error
// wrapping xen.ErrState and leaves the domain running; Destroy is then the
// caller's decision.
func (d *Driver) Shutdown(ctx context.Context, name string, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = DefaultShutdownTimeout
	}
	op := fmt.Sprintf("shut down domain %q", name)
	err := d.withDomain(ctx, "shut down", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		return dom.ShutdownFlags(golibvirt.DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
	})
	if err != nil {
		return err
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(statePoll)
	defer tick.Stop()
	for {
		info, err := d.Domain(ctx, name)
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		if info.State == xen.StateShutoff {
			d.log.Info("domain shut down", "domain", name)
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", op, ctx.Err())
		case <-deadline.C:
			return fmt.Errorf("%s: %w: still %s after %s; the guest ignores ACPI power-off, destroy it instead",
				op, xen.ErrState, info.State, timeout)
		case <-tick.C:
		}
	}
}

// Destroy stops a domain at once. A stopped domain is left alone.
func (d *Driver) Destroy(ctx context.Context, name string) error {
	return d.withDomain(ctx, "destroy", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		err := dom.DestroyFlags(golibvirt.DOMAIN_DESTROY_DEFAULT)
		if libvirtCode(err) == golibvirt.ERR_OPERATION_INVALID {
			return nil // not running
		}
		if err == nil {
			d.log.Info("domain destroyed", "domain", name)
		}
		return err
	})
}

// Undefine removes a stopped domain's definition. It refuses a running one
// (libvirt would make it transient instead, and it would vanish on stop).
func (d *Driver) Undefine(ctx context.Context, name string) error {
	return d.withDomain(ctx, "undefine", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		active, err := dom.IsActive()
		if err != nil {
			return err
		}
		if active {
			return fmt.Errorf("%w: it is running; shut it down or destroy it first", xen.ErrState)
		}
		err = dom.UndefineFlags(golibvirt.DOMAIN_UNDEFINE_MANAGED_SAVE |
			golibvirt.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | golibvirt.DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
		if err == nil {
			d.log.Info("domain undefined", "domain", name)
		}
		return err
	})
}

// Suspend pauses a domain's vCPUs.
func (d *Driver) Suspend(ctx context.Context, name string) error {
	return d.withDomain(ctx, "suspend", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		return dom.Suspend()
	})
}

// Resume continues a paused domain, including one restored through
// migrate-incoming.
func (d *Driver) Resume(ctx context.Context, name string) error {
	return d.withDomain(ctx, "resume", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		return dom.Resume()
	})
}

// ramPathFree refuses a RAM file that a running domain already maps: two
// QEMUs sharing one would silently overwrite each other's guest memory. (A
// restore target may be defined on the source's file while the source runs;
// it may only start once the source has stopped.)
func ramPathFree(conn *golibvirt.Connect, name, ramPath string) error {
	doms, err := conn.ListAllDomains(golibvirt.CONNECT_LIST_DOMAINS_ACTIVE)
	if err != nil {
		return err
	}
	defer func() {
		for i := range doms {
			doms[i].Free()
		}
	}()
	for i := range doms {
		other, err := doms[i].GetName()
		if err != nil || other == name {
			continue
		}
		spec, err := domainSpec(&doms[i])
		if err != nil || spec == nil {
			continue // stopped meanwhile, or not hostd's
		}
		if spec.RAMPath == ramPath {
			return fmt.Errorf("%w: its ram_path %s is in use by running domain %q; stop that one first", xen.ErrState, ramPath, other)
		}
	}
	return nil
}

// domainSpec reads hostd's spec from a domain's metadata; nil, nil for a
// domain hostd did not make.
func domainSpec(dom *golibvirt.Domain) (*xen.DomainSpec, error) {
	elem, err := dom.GetMetadata(golibvirt.DOMAIN_METADATA_ELEMENT, MetadataNamespace, golibvirt.DOMAIN_AFFECT_CURRENT)
	if err != nil {
		var lverr golibvirt.Error
		if errors.As(err, &lverr) && lverr.Code == golibvirt.ERR_NO_DOMAIN_METADATA {
			return nil, nil
		}
		return nil, err
	}
	return parseSpecMetadata(elem)
}

// AttachDisk hot-plugs a disk into a running domain, live only: the
// persistent definition (and hostd's spec metadata) stays as it was, so
// the owner of the disk re-attaches it after a restart of the domain. On
// the default i440fx machine the guest sees it through ACPI PCI hotplug.
func (d *Driver) AttachDisk(ctx context.Context, name string, disk xen.Disk) error {
	var p []string
	checkDiskSpec(func(f string, a ...any) { p = append(p, fmt.Sprintf(f, a...)) }, "disk", disk)
	if disk.Target == "" {
		p = append(p, "disk: target is required to attach a disk")
	}
	if len(p) > 0 {
		return fmt.Errorf("attach disk to %q: %w: %s", name, xen.ErrInvalidSpec, strings.Join(p, "; "))
	}
	if disk.Format == "" {
		disk.Format = "raw"
	}
	dx := diskXML(disk)
	x, err := dx.Marshal()
	if err != nil {
		return fmt.Errorf("attach disk to %q: %w", name, err)
	}
	return d.withDomain(ctx, "attach disk "+disk.Target+" to", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		active, err := dom.IsActive()
		if err != nil {
			return err
		}
		if !active {
			return fmt.Errorf("%w: disks are hot-plugged into a running domain only; start it first", xen.ErrState)
		}
		return dom.AttachDeviceFlags(x, golibvirt.DOMAIN_DEVICE_MODIFY_LIVE)
	})
}

// DetachDisk unplugs a hot-plugged disk. libvirt waits a few seconds for
// the guest to release it (ACPI eject); a guest that does not answer
// keeps the device, and this returns an error wrapping xen.ErrState.
func (d *Driver) DetachDisk(ctx context.Context, name, target string) error {
	if !targetRE.MatchString(target) {
		return fmt.Errorf("detach disk from %q: %w: target %q: use a virtio name such as vdb", name, xen.ErrInvalidSpec, target)
	}
	return d.withDomain(ctx, "detach disk "+target+" from", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		x, err := dom.GetXMLDesc(0)
		if err != nil {
			return err
		}
		var dd libvirtxml.Domain
		if err := dd.Unmarshal(x); err != nil {
			return err
		}
		for _, dk := range dd.Devices.Disks {
			if dk.Target == nil || dk.Target.Dev != target {
				continue
			}
			dk.Address = nil // libvirt matches on target; the address may not round-trip
			dx, err := dk.Marshal()
			if err != nil {
				return err
			}
			if err := dom.DetachDeviceFlags(dx, golibvirt.DOMAIN_DEVICE_MODIFY_LIVE); err != nil {
				var lverr golibvirt.Error
				if errors.As(err, &lverr) && lverr.Code == golibvirt.ERR_OPERATION_TIMEOUT {
					return fmt.Errorf("%w: the guest did not release disk %s: %v", xen.ErrState, target, err)
				}
				return err
			}
			return nil
		}
		return fmt.Errorf("%w: domain has no disk %s", xen.ErrNotFound, target)
	})
}
