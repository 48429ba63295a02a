package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"hostd/hostd/store"
	"hostd/hostd/valid"
	"hostd/xen"
)

// SlotPrefix starts the domain name of every warm slot. '.' is not allowed
// in VM names, so no VM is ever named like a slot.
const SlotPrefix = valid.SlotPrefix

// IsSlot reports whether a domain name is a warm slot's.
func IsSlot(domain string) bool { return strings.HasPrefix(domain, SlotPrefix) }

// SlotSpec is the domain of a warm slot: a VM of the given shape on this
// host's guest image, without disks or NICs, waiting for an incoming state
// on ramPath (served by the slot's memory server).
func (m *Manager) SlotSpec(domain string, memoryMiB uint64, vcpus int, ramPath string) (xen.DomainSpec, error) {
	spec, err := m.spec(Request{Name: domain, VCPUs: vcpus, MemoryMiB: memoryMiB,
		Kernel: m.cfg.Guest.Kernel, Initrd: m.cfg.Guest.Initrd, Cmdline: m.cfg.Guest.Cmdline})
	if err != nil {
		return xen.DomainSpec{}, fmt.Errorf("warm slot %s: %w", domain, err)
	}
	spec.RAMPath, spec.Incoming = ramPath, true
	return spec, nil
}

// StartSlot defines and starts a slot's domain: QEMU comes up paused with
// "-incoming defer". On failure no domain is left.
func (m *Manager) StartSlot(ctx context.Context, spec xen.DomainSpec) error {
	op := fmt.Sprintf("start warm slot %s", spec.Name)
	if !IsSlot(spec.Name) || !spec.Incoming {
		return fmt.Errorf("%s: %w: not a slot's spec", op, ErrInvalid)
	}
	if err := m.makeVMDirs(spec); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := m.hv.Define(ctx, spec); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := m.hv.Start(ctx, spec.Name); err != nil {
		_, cancel := m.removeDomain(ctx, spec.Name, "failed slot start")
		cancel()
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// RemoveSlotDomain destroys and undefines a slot's domain; the caller
// stops its memory server after, then removes its files (RemoveFiles).
func (m *Manager) RemoveSlotDomain(ctx context.Context, domain string) {
	_, cancel := m.removeDomain(ctx, domain, "slot removal")
	cancel()
}

// SlotFits says why a saved VM cannot be restored into a slot of spec
// slot ("" if it can). A slot is a QEMU already started: its memory size,
// vCPUs and devices are fixed, and the incoming device state must describe
// the same machine (QEMU refuses or, worse, misloads another). The guest
// image (kernel, initrd, command line) must be the same too: it is what
// the VM boots when it is restarted later.
func (m *Manager) SlotFits(saved, slot xen.DomainSpec) string {
	req := m.rehome(saved, "")
	switch {
	case req.MemoryMiB != slot.MemoryMiB:
		return fmt.Sprintf("memory %d MiB, the slot's %d MiB", req.MemoryMiB, slot.MemoryMiB)
	case req.VCPUs != slot.VCPUs:
		return fmt.Sprintf("%d vCPUs, the slot's %d", req.VCPUs, slot.VCPUs)
	case len(req.Disks) > 0 || len(req.NICs) > 0:
		return fmt.Sprintf("%d disks and %d NICs; slots have none", len(req.Disks), len(req.NICs))
	case req.Kernel != slot.Kernel || req.Initrd != slot.Initrd || req.Cmdline != slot.Cmdline:
		return "another guest image (kernel, initrd or command line) than the slot's"
	}
	return ""
}

// ClaimSlot records VM name as restored into the running slot domain of
// spec: from now on the VM is name to hostd and its API, the slot's domain
// to the hypervisor (Record.Domain). The caller loads the state, resumes,
// then calls Resumed.
func (m *Manager) ClaimSlot(ctx context.Context, name string, slot xen.DomainSpec) (VM, error) {
	op := fmt.Sprintf("restore VM %q into slot %s", name, slot.Name)
	if err := valid.VMName(name); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.record(name); err == nil {
		return VM{}, fmt.Errorf("%s: %w", op, ErrExists)
	}
	info, err := m.hv.Domain(ctx, slot.Name)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	now := time.Now().UTC()
	rec := Record{Name: name, UUID: info.UUID, Spec: slot, Created: now, Started: &now, ServedMemory: true, Restored: true,
		SerialOffset: fileSize(slot.SerialLog)}
	rec.Spec.Disks, rec.Spec.NICs = slices.Clone(slot.Disks), slices.Clone(slot.NICs)
	if err := store.Put(m.st, store.BucketVMs, name, rec); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	return m.join(ctx, rec)
}

// LeftoverSlots lists the slots no VM runs in whose domain (with this
// hostd's files) or directory exists: after a restart, the previous
// daemon's unclaimed slots, and the directories of slots whose start it
// did not finish.
func (m *Manager) LeftoverSlots(ctx context.Context) ([]string, error) {
	doms, err := m.hv.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list slots: %w", err)
	}
	recs, err := store.List[Record](m.st, store.BucketVMs)
	if err != nil {
		return nil, fmt.Errorf("list slots: %w", err)
	}
	claimed := map[string]bool{}
	for _, r := range recs {
		claimed[r.Domain()] = true
	}
	var out []string
	for _, d := range doms {
		if !IsSlot(d.Name) || claimed[d.Name] {
			continue
		}
		full, err := m.hv.Domain(ctx, d.Name)
		if err != nil || full.Spec == nil || !m.ownsFiles(*full.Spec) {
			continue // another hostd's
		}
		claimed[d.Name] = true
		out = append(out, d.Name)
	}
	ents, err := os.ReadDir(filepath.Join(m.cfg.StateDir, "vms"))
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("list slots: %w", err)
	}
	for _, e := range ents {
		if e.IsDir() && IsSlot(e.Name()) && !claimed[e.Name()] {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
