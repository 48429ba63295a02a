package swap

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"hostd/xen"
)

// QOM names of the plugged device: the NBD block node and the
// virtio-blk-pci device on it.
const (
	nodeName = "hostd-swap-nbd"
	deviceID = "hostd-swap"
)

// plug hot-plugs the device into the running domain. Through the QEMU
// monitor where there is one: blockdev-add takes the NBD client's
// reconnect-delay, which libvirt 9.0 drops from a disk's XML, and with it
// QEMU holds the disk's requests while hostd restarts instead of failing
// them in the guest. Elsewhere through the hypervisor's AttachDisk.
func (m *Manager) plug(ctx context.Context, rec Record) (how string, err error) {
	delay := uint(m.cfg.Swap.ReconnectDelay.Seconds())
	mon := m.hv.Monitor()
	if mon == nil {
		disk := xen.Disk{NBDSocket: rec.Socket, Target: Target, Serial: rec.Serial, NBDReconnectDelay: delay}
		return "hypervisor", m.hv.AttachDisk(ctx, m.vms.DomainOf(rec.VM), disk)
	}
	node := map[string]any{"driver": "nbd", "node-name": nodeName, "export": "swap",
		"server": map[string]any{"type": "unix", "path": rec.Socket}}
	if delay > 0 {
		node["reconnect-delay"] = delay
	}
	if _, err := mon.Command(ctx, m.vms.DomainOf(rec.VM), "blockdev-add", node); err != nil {
		return "", fmt.Errorf("add the NBD block node: %w", err)
	}
	dev := map[string]any{"driver": "virtio-blk-pci", "id": deviceID, "drive": nodeName, "serial": rec.Serial}
	if _, err := mon.Command(ctx, m.vms.DomainOf(rec.VM), "device_add", dev); err != nil {
		if _, derr := mon.Command(ctx, m.vms.DomainOf(rec.VM), "blockdev-del", map[string]any{"node-name": nodeName}); derr != nil {
			m.log.Warn("remove the NBD block node after a failed device_add", "vm", rec.VM, "err", derr)
		}
		return "", fmt.Errorf("add the virtio disk: %w", err)
	}
	return "monitor", nil
}

// unplug removes the device: device_del asks the guest to release it
// (ACPI eject), which it does at its own pace, so the block node is
// deleted once the device is gone from QOM.
func (m *Manager) unplug(ctx context.Context, rec Record) error {
	if rec.Plugged != "monitor" {
		return m.hv.DetachDisk(ctx, m.vms.DomainOf(rec.VM), Target)
	}
	mon := m.hv.Monitor()
	if mon == nil {
		return fmt.Errorf("%w: the device was plugged through a QEMU monitor this hypervisor lacks", ErrState)
	}
	if _, err := mon.Command(ctx, m.vms.DomainOf(rec.VM), "device_del", map[string]any{"id": deviceID}); err != nil && !isQMPClass(err, "DeviceNotFound") {
		return fmt.Errorf("remove the virtio disk: %w", err)
	}
	for i := 0; ; i++ {
		out, err := mon.Command(ctx, m.vms.DomainOf(rec.VM), "qom-list", map[string]any{"path": "/machine/peripheral"})
		if err != nil {
			return fmt.Errorf("wait for the guest to release the disk: %w", err)
		}
		var props []struct {
			Name string `json:"name"`
		}
		if err := json.Unmarshal(out, &props); err != nil {
			return fmt.Errorf("wait for the guest to release the disk: %w", err)
		}
		if !slices.ContainsFunc(props, func(p struct {
			Name string `json:"name"`
		}) bool {
			return p.Name == deviceID
		}) {
			break
		}
		if i == 100 {
			return fmt.Errorf("%w: the guest did not release the swap disk within 20 s (swapoff in the guest, then retry)", ErrState)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	if _, err := mon.Command(ctx, m.vms.DomainOf(rec.VM), "blockdev-del", map[string]any{"node-name": nodeName}); err != nil && !isQMPClass(err, "GenericError") {
		return fmt.Errorf("remove the NBD block node: %w", err)
	}
	return nil
}

func isQMPClass(err error, class string) bool {
	var me *xen.MonitorError
	return errors.As(err, &me) && me.Class == class
}
