package vm

import (
	"fmt"
	"os"
	"time"

	"hostd/hostd/errdefs"
	"hostd/hostd/valid"
	"hostd/xen"
)

// Errors the API maps to 4xx codes. Hypervisor errors (xen.Err*) pass
// through wrapped.
var (
	ErrInvalid  = valid.ErrRequest
	ErrNotFound = errdefs.New(errdefs.ErrNotFound, "not_found", "no such VM")
	ErrExists   = errdefs.New(errdefs.ErrConflict, "exists", "VM already exists")
)

// Request is the body of POST /v1/vms.
type Request struct {
	Name      string `json:"name"`
	VCPUs     int    `json:"vcpus,omitempty"`      // default 1
	MemoryMiB uint64 `json:"memory_mib,omitempty"` // default 256
	// Kernel, Initrd, Cmdline default to the configured guest image.
	Kernel  string     `json:"kernel,omitempty"`
	Initrd  string     `json:"initrd,omitempty"`
	Cmdline string     `json:"cmdline,omitempty"`
	Disks   []xen.Disk `json:"disks,omitempty"`
	NICs    []xen.NIC  `json:"nics,omitempty"`
	// Start boots the VM right away (default true).
	Start *bool `json:"start,omitempty"`
	// ServedMemory puts the guest's RAM on a file hostd's memory server
	// serves, which protection (checkpointing) needs. Default: a plain file.
	ServedMemory bool `json:"served_memory,omitempty"`
}

// Record is what the store keeps per VM.
type Record struct {
	Name    string         `json:"name"`
	UUID    string         `json:"uuid"`
	Spec    xen.DomainSpec `json:"spec"`
	Created time.Time      `json:"created"`
	// Started is when hostd last started the domain; Ready when the guest
	// agent announced itself after that start.
	Started *time.Time `json:"started,omitempty"`
	Ready   *time.Time `json:"ready,omitempty"`
	// BootMS is Started to Ready: the create-to-ready time a user sees.
	BootMS float64 `json:"boot_ms,omitempty"`
	// GuestUptimeMS is the guest's own uptime at its ready line: the part
	// of BootMS spent inside the guest (kernel and agent start).
	GuestUptimeMS uint64 `json:"guest_uptime_ms,omitempty"`
	// SerialOffset is the serial log's size at the last start: readiness
	// is looked for after it, also by a restarted daemon.
	SerialOffset int64 `json:"serial_offset,omitempty"`
	// ServedMemory: the RAM file is served by the VM's memory server.
	ServedMemory bool `json:"served_memory,omitempty"`
	// Restored: brought back from a backup's restore point.
	Restored bool `json:"restored,omitempty"`
	// Adopted: found running in libvirt with hostd's metadata, no record.
	Adopted bool `json:"adopted,omitempty"`
	// Vanished: the record exists but the hypervisor no longer has the domain.
	Vanished bool `json:"vanished,omitempty"`
}

// Domain is the hypervisor domain that runs the VM, which also names its
// directory and memory server: the VM's name, except for a VM restored into
// a warm slot, which runs on in the slot's domain (a running domain cannot
// be renamed).
func (r Record) Domain() string {
	if r.Spec.Name != "" {
		return r.Spec.Name
	}
	return r.Name
}

// VM is what the API returns: the record joined with live state.
type VM struct {
	Record
	State  xen.State `json:"state"`
	Reason string    `json:"reason,omitempty"`
}

// MinMemoryMiB is the least memory a VM is created with.
const MinMemoryMiB = 16

// validate checks what the manager can check without the hypervisor; the
// driver validates the rest (host limits, device names) before defining.
func (r *Request) validate(hostCPUs int, hostMemMiB uint64) error {
	if err := valid.VMName(r.Name); err != nil {
		return err
	}
	switch {
	case r.VCPUs < 1:
		return fmt.Errorf("%w: vcpus must be at least 1", ErrInvalid)
	case hostCPUs > 0 && r.VCPUs > hostCPUs:
		return fmt.Errorf("%w: vcpus %d exceeds the host's %d CPUs", ErrInvalid, r.VCPUs, hostCPUs)
	case r.MemoryMiB < MinMemoryMiB:
		return fmt.Errorf("%w: memory_mib %d is below the minimum of %d", ErrInvalid, r.MemoryMiB, MinMemoryMiB)
	case hostMemMiB > 0 && r.MemoryMiB > hostMemMiB:
		return fmt.Errorf("%w: memory_mib %d exceeds the host's %d MiB", ErrInvalid, r.MemoryMiB, hostMemMiB)
	}
	for what, p := range map[string]string{"kernel": r.Kernel, "initrd": r.Initrd} {
		if p == "" && what == "initrd" {
			continue
		}
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			return fmt.Errorf("%w: %s %q does not exist or is not a regular file (build the guest with `make guest` or name another)", ErrInvalid, what, p)
		}
	}
	return nil
}
