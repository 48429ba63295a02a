package libvirt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"hostd/xen"
)

// bootedToUserSpace reports whether a serial log shows a Linux kernel that
// got as far as starting user space, which is what "KVM works" has to mean:
// on some hosts (PVM) /dev/kvm runs real-mode code but a stock kernel never
// boots.
func bootedToUserSpace(log []byte) bool {
	for _, m := range []string{"Run /init as init process", "Freeing unused kernel image", "HOSTD-AGENT READY"} {
		if bytes.Contains(log, []byte(m)) {
			return true
		}
	}
	return false
}

// resolveAccel settles the accelerator once per driver.
func (d *Driver) resolveAccel(ctx context.Context) (xen.Accel, error) {
	switch d.cfg.Accel {
	case xen.AccelTCG:
		return xen.AccelTCG, nil
	case xen.AccelKVM:
		d.log.Info("accelerator kvm by configuration, not probed")
		return xen.AccelKVM, nil
	}
	tcg := func(reason string, args ...any) (xen.Accel, error) {
		d.log.Info("accelerator tcg", append([]any{"reason", reason}, args...)...)
		return xen.AccelTCG, nil
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return tcg("no /dev/kvm", "err", err)
	}
	hasKVM, err := d.capsHaveKVM(ctx)
	if err != nil {
		return "", err
	}
	if !hasKVM {
		return tcg("libvirt offers no kvm domain type for x86_64")
	}
	if d.cfg.ProbeKernel == "" {
		return tcg("no probe kernel configured (Config.ProbeKernel): KVM unproven")
	}
	start := time.Now()
	err = d.probeKVM(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return "", fmt.Errorf("kvm probe: %w", ctx.Err())
		}
		return tcg("kvm probe guest did not boot", "err", err, "took", time.Since(start).Round(time.Millisecond))
	}
	d.log.Info("accelerator kvm", "reason", "probe guest booted under kvm", "took", time.Since(start).Round(time.Millisecond))
	return xen.AccelKVM, nil
}

func (d *Driver) capsHaveKVM(ctx context.Context) (bool, error) {
	var found bool
	err := d.call(ctx, "read capabilities", func(conn *golibvirt.Connect) error {
		doc, err := conn.GetCapabilities()
		if err != nil {
			return err
		}
		var caps libvirtxml.Caps
		if err := caps.Unmarshal(doc); err != nil {
			return fmt.Errorf("parse capabilities: %w", err)
		}
		for _, g := range caps.Guests {
			if g.OSType != "hvm" || g.Arch.Name != "x86_64" {
				continue
			}
			for _, dt := range g.Arch.Domains {
				found = found || dt.Type == "kvm"
			}
		}
		return nil
	})
	return found, err
}

// probeKVM boots ProbeKernel in a transient KVM domain and waits for a
// marker on its serial console. The domain is auto-destroyed with the
// connection even if hostd dies mid-probe.
func (d *Driver) probeKVM(ctx context.Context) error {
	dir, err := os.MkdirTemp(d.cfg.ProbeDir, "hostd-kvm-probe-")
	if err != nil {
		return fmt.Errorf("make probe dir: %w", err)
	}
	defer os.RemoveAll(dir)
	log := filepath.Join(dir, "serial.log")
	name := "hostd-kvm-probe-" + filepath.Base(dir)[len("hostd-kvm-probe-"):]
	port := uint(0)
	src := &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: log, Append: "on"}}
	dom := &libvirtxml.Domain{
		Type:     "kvm",
		Name:     name,
		Memory:   &libvirtxml.DomainMemory{Value: 256, Unit: "MiB"},
		VCPU:     &libvirtxml.DomainVCPU{Value: 1},
		CPU:      &libvirtxml.DomainCPU{Mode: "host-passthrough"},
		OnReboot: "destroy",
		OnCrash:  "destroy",
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Arch: "x86_64", Type: "hvm"},
			Kernel:  d.cfg.ProbeKernel,
			Initrd:  d.cfg.ProbeInitrd,
			Cmdline: "console=ttyS0 panic=-1",
		},
		Devices: &libvirtxml.DomainDeviceList{
			Serials: []libvirtxml.DomainSerial{{Source: src, Target: &libvirtxml.DomainSerialTarget{Port: &port}}},
		},
	}
	doc, err := dom.Marshal()
	if err != nil {
		return fmt.Errorf("render probe domain: %w", err)
	}
	err = d.call(ctx, "start kvm probe domain", func(conn *golibvirt.Connect) error {
		dom, err := conn.DomainCreateXML(doc, golibvirt.DOMAIN_START_AUTODESTROY)
		if err != nil {
			return err
		}
		return dom.Free()
	})
	if err != nil {
		return err
	}
	defer func() {
		// The caller's ctx may be done; cleanup gets its own bound.
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := d.Destroy(cctx, name); err != nil && !errors.Is(err, xen.ErrNotFound) {
			d.log.Warn("destroy kvm probe domain", "domain", name, "err", err)
		}
	}()

	ctx, cancel := context.WithTimeout(ctx, d.cfg.ProbeTimeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		if out, err := os.ReadFile(log); err == nil && bootedToUserSpace(out) {
			return nil
		}
		info, err := d.Domain(ctx, name)
		if err == nil && info.State != xen.StateRunning {
			return fmt.Errorf("probe domain is %s (%s) before user space started", info.State, info.Reason)
		}
		if errors.Is(err, xen.ErrNotFound) {
			return fmt.Errorf("probe domain stopped before user space started")
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no kernel boot marker on the serial console within %s", d.cfg.ProbeTimeout)
		case <-tick.C:
		}
	}
}
