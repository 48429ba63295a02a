package xen

import (
	"context"
	"encoding/json"
	"hostd/hostd/errdefs"
	"os"
	"time"
)

// Errors a driver returns, wrapped with the failing operation. Callers test
// them with errors.Is; the HTTP layer maps them to status codes.
var (
	// ErrNotFound: no domain of that name.
	ErrNotFound = errdefs.New(errdefs.ErrNotFound, "not_found", "domain not found")
	// ErrExists: a domain of that name is already defined.
	ErrExists = errdefs.New(errdefs.ErrConflict, "exists", "domain already exists")
	// ErrInvalidSpec: the spec cannot describe a bootable domain.
	ErrInvalidSpec = errdefs.New(errdefs.ErrInvalid, "invalid_request", "invalid domain spec")
	// ErrUnavailable: the hypervisor (libvirtd) cannot be reached; retry later.
	ErrUnavailable = errdefs.New(errdefs.ErrUnavailable, "hypervisor_unavailable", "hypervisor unavailable")
	// ErrState: the operation does not apply in the domain's current state.
	ErrState = errdefs.New(errdefs.ErrConflict, "invalid_state", "operation not valid in domain state")
)

// SpecChecker is an optional ability of a driver: checking what a request
// asks of a domain (shape, boot source, disks, NICs) before hostd creates
// anything for it, with the errors Define would give. The files hostd
// places itself (RAM, serial log, agent socket) are not checked: their
// directories are made after the check.
type SpecChecker interface {
	CheckSpec(spec DomainSpec) error
}

// Hypervisor is the second-layer hypervisor as hostd uses it. Every method
// is safe for concurrent use. Domains are named; names are unique per host.
type Hypervisor interface {
	// Host describes the hypervisor and the machine it runs on.
	Host(ctx context.Context) (HostInfo, error)

	// Define makes a persistent domain from spec without starting it.
	Define(ctx context.Context, spec DomainSpec) error
	// Start boots a defined domain. With spec.Incoming the domain starts
	// paused, waiting for migrate-incoming (restore).
	Start(ctx context.Context, name string) error
	// Shutdown asks the guest to power off (ACPI) and waits until it has or
	// timeout passes; on timeout it returns an error wrapping ErrState and
	// leaves the domain running.
	Shutdown(ctx context.Context, name string, timeout time.Duration) error
	// Destroy stops a domain at once (power cut). Stopping a stopped domain
	// is not an error.
	Destroy(ctx context.Context, name string) error
	// ClearIncoming redefines a domain defined with Incoming without it: a
	// running (restored) domain runs on unchanged, its next Start boots the
	// guest cold instead of waiting for a migration that never comes. A
	// domain without Incoming is left alone.
	ClearIncoming(ctx context.Context, name string) error
	// Undefine removes a stopped domain's definition.
	Undefine(ctx context.Context, name string) error
	// Suspend and Resume pause and continue a running domain's vCPUs.
	Suspend(ctx context.Context, name string) error
	Resume(ctx context.Context, name string) error

	// Domain returns one domain's state and recorded spec. List returns all
	// domains that this hypervisor knows, including ones hostd did not
	// create, with their state but without Spec: it costs the same few
	// round trips whatever the number of domains, and only adoption needs
	// the spec (ask Domain for it).
	Domain(ctx context.Context, name string) (DomainInfo, error)
	List(ctx context.Context) ([]DomainInfo, error)
	// Stats samples CPU time, memory and balloon of a running domain.
	Stats(ctx context.Context, name string) (DomainStats, error)
	// SetMemory sets the balloon target of a running domain.
	SetMemory(ctx context.Context, name string, mib uint64) error
	// AttachDisk hot-plugs a disk into a running domain (not into its
	// persistent definition: the caller owns the disk's lifetime and
	// attaches it again after a restart). Target must be set.
	AttachDisk(ctx context.Context, name string, disk Disk) error
	// DetachDisk unplugs the disk with that target from a running domain.
	// The guest is asked to release it; libvirt returns once QEMU has
	// removed it or its wait ends (then an error wrapping ErrState).
	DetachDisk(ctx context.Context, name, target string) error

	// Events delivers lifecycle events until ctx ends; the channel is closed
	// then. Events may be dropped if the receiver falls behind: consumers
	// treat them as hints and re-read state with Domain.
	Events(ctx context.Context) (<-chan LifecycleEvent, error)

	// Monitor reaches QEMU's monitor of a running domain (nil for drivers
	// without QEMU).
	Monitor() Monitor

	Close() error
}

// Monitor is the QEMU monitor passthrough: QMP commands that libvirt does
// not model (migration capabilities, fd passing, migrate-incoming).
type Monitor interface {
	// Command runs one QMP command ({"execute":..., "arguments":...}) and
	// returns its "return" member, or an error carrying QEMU's error class
	// and description.
	Command(ctx context.Context, domain string, execute string, args any) (json.RawMessage, error)
	// CommandWithFiles is Command with file descriptors attached (for
	// getfd/add-fd). The files stay owned by the caller.
	CommandWithFiles(ctx context.Context, domain string, execute string, args any, files []*os.File) (json.RawMessage, error)
}

// Accel is how guest CPUs are run.
type Accel string

const (
	AccelAuto Accel = "auto" // KVM if a probe guest really boots, else TCG
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// HostInfo describes the hypervisor and host, for GET /v1/host.
type HostInfo struct {
	Driver        string   `json:"driver"`     // e.g. "QEMU"
	URI           string   `json:"uri"`        // libvirt URI in use
	Accel         Accel    `json:"accel"`      // resolved: kvm or tcg
	Hypervisor    string   `json:"hypervisor"` // e.g. "QEMU 7.2.0"
	Library       string   `json:"library"`    // e.g. "libvirt 9.0.0"
	CPUModel      string   `json:"cpu_model"`
	CPUFlags      []string `json:"cpu_flags"`
	CPUs          int      `json:"cpus"`
	MemoryMiB     uint64   `json:"memory_mib"`
	FreeMemoryMiB uint64   `json:"free_memory_mib"`
}

// DomainSpec is everything hostd decides about a nested VM. A driver turns
// it into its own configuration (libvirt XML); nothing else does.
type DomainSpec struct {
	Name      string `json:"name"`
	UUID      string `json:"uuid,omitempty"` // chosen by the driver if empty
	VCPUs     int    `json:"vcpus"`
	MemoryMiB uint64 `json:"memory_mib"`

	// Boot: either a kernel (+ initrd, cmdline), or a bootable disk (the
	// first entry of Disks).
	Kernel  string `json:"kernel,omitempty"`
	Initrd  string `json:"initrd,omitempty"`
	Cmdline string `json:"cmdline,omitempty"`

	Disks []Disk `json:"disks,omitempty"`
	NICs  []NIC  `json:"nics,omitempty"`

	// RAMPath is the file that backs guest RAM (QEMU memory-backend-file,
	// share=on). Always set: the checkpoint code serves this file. Its
	// directory must exist; QEMU creates the file.
	RAMPath string `json:"ram_path"`
	// SerialLog receives the guest's serial console (appended).
	SerialLog string `json:"serial_log"`
	// AgentSocket, if set, is the host end (unix socket, QEMU listens) of a
	// virtio-serial channel named AgentChannel for the guest agent.
	AgentSocket string `json:"agent_socket,omitempty"`

	// Incoming starts the domain paused with "-incoming defer", ready for
	// migrate-incoming: the restore path. It is part of the definition:
	// every Start of the domain waits for an incoming state, so a domain to
	// be cold-booted later on the same name is undefined and defined again
	// without it.
	Incoming bool `json:"incoming,omitempty"`
}

// AgentChannel is the virtio-serial port name the guest agent opens.
const AgentChannel = "org.hostd.agent.0"

// Disk is a block device of the guest.
type Disk struct {
	Path     string `json:"path"`             // file or block device on the host
	Format   string `json:"format,omitempty"` // raw (default) or qcow2
	ReadOnly bool   `json:"read_only,omitempty"`
	// Target is the guest device name (vda, vdb, ...); assigned in order if empty.
	Target string `json:"target,omitempty"`
	// NBD, if set, attaches an NBD export on this unix socket instead of Path.
	NBDSocket string `json:"nbd_socket,omitempty"`
	NBDExport string `json:"nbd_export,omitempty"`
	// NBDReconnectDelay (seconds, NBD only) makes QEMU reconnect to a
	// server that went away (a restarted hostd serving the export) instead
	// of failing the disk; requests wait up to that long.
	NBDReconnectDelay uint `json:"nbd_reconnect_delay,omitempty"`
	// Serial is what the guest sees as the disk's serial number
	// (/sys/block/vdX/serial): how it finds a hot-plugged disk.
	Serial string `json:"serial,omitempty"`
}

// NIC is a virtio network interface on a host tap device. A tap that exists
// when the domain is defined is used as is (libvirt neither configures nor
// deletes it; MTU then only sets the guest side); an absent one is created
// by libvirt when the domain starts and deleted when it stops.
type NIC struct {
	Tap string `json:"tap"`           // host tap device name; created by libvirt if absent
	MAC string `json:"mac,omitempty"` // chosen by the driver if empty
	MTU int    `json:"mtu,omitempty"`
}

// State is a domain's run state, as libvirt reports it.
type State string

const (
	StateRunning  State = "running"
	StatePaused   State = "paused"
	StateShutoff  State = "shutoff"
	StateShutdown State = "shutting_down"
	StateCrashed  State = "crashed"
	// StatePMSuspended: the guest suspended itself (ACPI S3/S4).
	StatePMSuspended State = "pmsuspended"
	StateUnknown     State = "unknown"
)

// DomainInfo is a domain's identity and state.
type DomainInfo struct {
	Name       string `json:"name"`
	UUID       string `json:"uuid"`
	ID         int    `json:"id,omitempty"` // hypervisor's run id, 0 when off
	State      State  `json:"state"`
	Reason     string `json:"reason,omitempty"`
	VCPUs      int    `json:"vcpus"`
	MemoryMiB  uint64 `json:"memory_mib"`
	Persistent bool   `json:"persistent"`
	// Spec is the spec the domain was made from, if the driver recorded it
	// (libvirt: in the domain's metadata), so hostd can adopt domains after a
	// restart without its own store.
	Spec *DomainSpec `json:"spec,omitempty"`
}

// DomainStats is one sample of a running domain's counters.
type DomainStats struct {
	CPUTime      time.Duration `json:"cpu_time_ns"`
	MemoryMiB    uint64        `json:"memory_mib"`  // current allocation
	BalloonMiB   uint64        `json:"balloon_mib"` // balloon target
	RSSMiB       uint64        `json:"rss_mib"`
	UnusedMiB    uint64        `json:"unused_mib,omitempty"`    // guest-reported, if any
	AvailableMiB uint64        `json:"available_mib,omitempty"` // guest-reported, if any
	SwapInPages  uint64        `json:"swap_in,omitempty"`
	SwapOutPages uint64        `json:"swap_out,omitempty"`
}

// LifecycleEvent reports a domain state change.
type LifecycleEvent struct {
	Time   time.Time `json:"time"`
	Domain string    `json:"domain"`
	UUID   string    `json:"uuid"`
	Event  string    `json:"event"`  // defined, undefined, started, suspended, resumed, stopped, shutdown, crashed, pmsuspended, reconnected
	Detail string    `json:"detail"` // libvirt's detail, e.g. "booted", "destroyed"
}

// LifecycleEvent.Event values.
const (
	EventDefined     = "defined"
	EventUndefined   = "undefined"
	EventStarted     = "started"
	EventSuspended   = "suspended"
	EventResumed     = "resumed"
	EventStopped     = "stopped"
	EventShutdown    = "shutdown"
	EventCrashed     = "crashed"
	EventPMSuspended = "pmsuspended"
	// EventReconnected has no Domain: the driver lost the hypervisor and got
	// it back. Events of the gap are lost, so consumers re-read every domain.
	EventReconnected = "reconnected"
)

// MonitorError is QEMU's answer to a failed monitor command (QMP "error").
// Monitor methods return it wrapped; find it with errors.As.
type MonitorError struct {
	Command string `json:"command"`
	Class   string `json:"class"` // e.g. "GenericError", "DeviceNotFound"
	Desc    string `json:"desc"`
}

func (e *MonitorError) Error() string {
	return "qemu monitor: " + e.Command + ": " + e.Class + ": " + e.Desc
}
