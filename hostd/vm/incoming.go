package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"hostd/hostd/events"
	"hostd/hostd/store"
	"hostd/xen"
)

// CreateIncoming defines and starts a domain that waits for a saved device
// state (a restore): QEMU comes up paused with "-incoming defer" on the RAM
// file ramPath, which a memory server already serves. The spec is a saved
// one from another host: its files are re-homed under this host's
// directories (and its kernel replaced by this host's guest image when the
// saved path does not exist here; a restored guest does not run it). The
// caller loads the state, resumes, then calls Resumed. On failure nothing
// is left but the memory server, which is the caller's.
func (m *Manager) CreateIncoming(ctx context.Context, saved xen.DomainSpec, name, ramPath string) (VM, error) {
	op := fmt.Sprintf("create incoming VM %q", name)
	req := m.rehome(saved, name)
	host, err := m.hv.Host(ctx)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := req.validate(host.CPUs, host.MemoryMiB); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.record(name); err == nil {
		return VM{}, fmt.Errorf("%s: %w", op, ErrExists)
	}
	spec, err := m.spec(req)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	spec.RAMPath, spec.Incoming = ramPath, true
	if err := os.MkdirAll(filepath.Dir(spec.AgentSocket), 0o750); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	undo := func() {
		_, cancel := m.removeDomain(ctx, name, "failed restore")
		cancel()
	}
	if err := m.hv.Define(ctx, spec); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := m.hv.Start(ctx, name); err != nil {
		undo()
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	info, err := m.hv.Domain(ctx, name)
	if err != nil {
		undo()
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	now := time.Now().UTC()
	rec := Record{Name: name, UUID: info.UUID, Spec: spec, Created: now, Started: &now, ServedMemory: true, Restored: true,
		SerialOffset: fileSize(spec.SerialLog)}
	if err := store.Put(m.st, store.BucketVMs, name, rec); err != nil {
		undo()
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	return m.join(ctx, rec)
}

// rehome is the request a saved spec is restored as on this host: its
// kernel is replaced by this host's guest image when the saved path does
// not exist here.
func (m *Manager) rehome(saved xen.DomainSpec, name string) Request {
	req := Request{Name: name, VCPUs: saved.VCPUs, MemoryMiB: saved.MemoryMiB, Kernel: saved.Kernel, Initrd: saved.Initrd,
		Cmdline: saved.Cmdline, Disks: saved.Disks, NICs: saved.NICs, ServedMemory: true}
	if _, err := os.Stat(req.Kernel); err != nil {
		req.Kernel, req.Initrd = m.cfg.Guest.Kernel, m.cfg.Guest.Initrd
	} else if req.Initrd != "" {
		if _, err := os.Stat(req.Initrd); err != nil {
			req.Kernel, req.Initrd = m.cfg.Guest.Kernel, m.cfg.Guest.Initrd
		}
	}
	return req
}

// DiscardIncoming removes a VM CreateIncoming made whose restore failed.
func (m *Manager) DiscardIncoming(ctx context.Context, name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	dom := name
	if rec, err := m.record(name); err == nil {
		dom = rec.Domain()
	}
	_, cancel := m.removeDomain(ctx, dom, "failed restore")
	cancel()
	_ = m.st.Delete(store.BucketVMs, name)
}

// RemoveFiles removes what a failed restore or a removed slot left in a
// domain's directory (its memory server must be stopped first).
func (m *Manager) RemoveFiles(domain string) {
	spec, err := m.spec(Request{Name: domain})
	if err != nil {
		m.log.Error("remove files of a domain: not a domain name; nothing removed", "domain", domain, "err", err)
		return
	}
	m.removeVMFiles(spec)
}

// Resumed records that a restored VM runs: it is ready at once (its guest
// agent was ready when it was saved).
func (m *Manager) Resumed(ctx context.Context, name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, err := m.record(name)
	if err != nil {
		return
	}
	now := time.Now().UTC()
	rec.Ready = &now
	rec.BootMS = float64(now.Sub(*rec.Started).Microseconds()) / 1000
	if err := store.Put(m.st, store.BucketVMs, name, rec); err != nil {
		m.log.Error("record restored VM", "vm", name, "err", err)
	}
	m.ev.Publish(events.Event{Type: "vm.ready", VM: name, Data: map[string]any{"restored": true, "boot_ms": rec.BootMS}})
	// The definition still says -incoming: redefine it so that the VM's
	// next start boots it (the running QEMU is not touched). Should this
	// fail, startLocked tries again before a start.
	if err := m.hv.ClearIncoming(ctx, rec.Domain()); err != nil {
		m.log.Warn("redefine restored VM without incoming; retried at its next start", "vm", name, "err", err)
		return
	}
	rec.Spec.Incoming = false
	if err := store.Put(m.st, store.BucketVMs, name, rec); err != nil {
		m.log.Error("record restored VM", "vm", name, "err", err)
	}
}
