package memserver

import (
	"context"

	"hostd/checkpoint/restore"
	"time"
)

// Config is what a memory server process starts with. hostd writes it as
// JSON to <vm dir>/memserver.json and starts `hostd memserve -config FILE`.
type Config struct {
	VM     string `json:"vm"`     // hostd's VM name: logs and the default backup id
	Dir    string `json:"dir"`    // the FUSE mount point (created if missing)
	Size   int64  `json:"size"`   // guest RAM in bytes, a multiple of 4096
	Socket string `json:"socket"` // control socket (mode 0600)
	// Restore, if set, serves pages the file does not hold yet from a
	// backup's restore point instead of zeros (the restore issue).
	Restore *Restore `json:"restore,omitempty"`
	// Slot starts a warm slot: zero pages, no restore yet, until Claim
	// names the restore point it serves from then on (Restore must be
	// unset). A QEMU waiting for an incoming state maps the file
	// meanwhile; if anything read or wrote a page before the claim, the
	// claim is refused: those pages would shadow the restore point's.
	Slot bool `json:"slot,omitempty"`
	// LogLevel: debug | info | warn | error (JSON logs on stderr).
	LogLevel string `json:"log_level,omitempty"`
}

// TLSFiles name the PEM files of a host's identity towards backups.
type TLSFiles struct {
	CA         string `json:"ca"`
	Cert       string `json:"cert"`
	Key        string `json:"key"`
	ServerName string `json:"server_name,omitempty"` // default: the backup address's host
}

// Protection starts continuous checkpointing to a backup.
type Protection struct {
	Backup string   `json:"backup"` // host:port of a backup-role hostd
	ID     string   `json:"id"`     // the VM's id at the backup (default Config.VM)
	TLS    TLSFiles `json:"tls"`
	// Bound is T: the time within which an evacuation must complete.
	Bound time.Duration `json:"bound"`
	// CommitInterval: how often pages streamed so far are committed as a
	// (non-restorable) epoch. Zero: only Commit commits, so the backup's
	// last restore point is never overwritten by pages of a later,
	// unfinished epoch (crash-consistent epochs mode).
	CommitInterval time.Duration `json:"commit_interval"`
	// Rate caps this VM's backup traffic in bytes/s (its fair share of the
	// host's backup bandwidth); 0 = unlimited. SetRate changes it.
	Rate float64 `json:"rate,omitempty"`
}

// Restore makes a memory server start from a backup's restore point.
type Restore struct {
	Backup string   `json:"backup"`
	ID     string   `json:"id"`
	TLS    TLSFiles `json:"tls"`
	Epoch  uint64   `json:"epoch,omitempty"` // 0: the latest restore point
	// Mode "lazy": pages are fetched on first touch and by a background
	// prefetcher; "full": every page is copied before Start returns.
	Mode         string  `json:"mode"`
	PrefetchRate float64 `json:"prefetch_rate,omitempty"` // bytes/s; 0 = unlimited
	// DeferPrefetch holds a lazy restore's prefetcher until StartPrefetch
	// (hostd calls it at the guest's resume): started at once, it competes
	// for the CPUs with QEMU's start and the device-state load.
	DeferPrefetch bool `json:"defer_prefetch,omitempty"`
}

// State names a memory server's protection state.
type State string

const (
	StateUnprotected State = "unprotected"
	StateCopying     State = "copying"   // first full copy in progress
	StateProtected   State = "protected" // streaming; the bound holds (headroom >= 0)
	StateDegraded    State = "degraded"  // backup unreachable or bound at risk; Reason says why
)

// Status is a memory server's snapshot.
type Status struct {
	VM      string `json:"vm"`
	PID     int    `json:"pid"`
	RAMPath string `json:"ram_path"`
	Size    int64  `json:"size"`

	State  State  `json:"state"`
	Reason string `json:"reason,omitempty"`
	Backup string `json:"backup,omitempty"`
	ID     string `json:"id,omitempty"`

	// First full copy.
	CopyDone  int64 `json:"copy_done"`
	CopyTotal int64 `json:"copy_total"`

	Unflushed int64         `json:"unflushed"` // bytes dirty or queued, not yet sent
	Cap       int64         `json:"cap"`       // dirty cap applied to the mount
	Bandwidth float64       `json:"bandwidth"` // measured, bytes/s
	Rate      float64       `json:"rate"`      // share limit, bytes/s (0 = none)
	Bound     time.Duration `json:"bound"`     // current bound (shrinks after a notice)
	// PredictedEvacuation with Unflushed bytes at Bandwidth; Headroom is
	// Bound minus it (negative: the bound would be missed).
	PredictedEvacuation time.Duration `json:"predicted_evacuation"`
	Headroom            time.Duration `json:"headroom"`
	Notice              bool          `json:"notice"`

	AckedEpoch       uint64    `json:"acked_epoch"`
	RestorableEpoch  uint64    `json:"restorable_epoch"`
	LastCommit       time.Time `json:"last_commit,omitempty"`
	Reconnects       int64     `json:"reconnects"`
	BytesSent        int64     `json:"bytes_sent"`
	BytesWrittenBack int64     `json:"bytes_written_back"`

	// Slot: a warm slot not claimed yet.
	Slot bool `json:"slot,omitempty"`

	// Restore progress (zero unless started with Restore).
	Resident      int64 `json:"resident"`       // bytes in the page cache or known zero
	ResidentTotal int64 `json:"resident_total"` // bytes the restore must bring
	FaultCount    int64 `json:"fault_count"`
	FullyResident bool  `json:"fully_resident"`
	// Restore is the restore's full progress; RestoreEvents its latest
	// events (outages, corrupt pages, residency), RestoreEventSeq how many
	// there were in all, so a poller can tell which it has not seen.
	Restore         *restore.Status `json:"restore,omitempty"`
	RestoreEvents   []restore.Event `json:"restore_events,omitempty"`
	RestoreEventSeq int64           `json:"restore_event_seq,omitempty"`
}

// SyncReport is what a final flush did.
type SyncReport struct {
	Bytes    int64         `json:"bytes"` // bytes that were unflushed when it began
	Duration time.Duration `json:"duration"`
}

// CommitReport is what a restorable commit did.
type CommitReport struct {
	Epoch      uint64        `json:"epoch"`
	StateBytes int64         `json:"state_bytes"`
	Duration   time.Duration `json:"duration"` // sending the state + the backup's durable ack
}

// Control is the memory server's control API as hostd sees it; Client
// implements it over the control socket. Errors the server answers with
// are *Error (4xx: bad input or wrong state; 5xx: the server or its backup
// failed); a server that does not answer gives an error wrapping
// ErrNotRunning.
type Control interface {
	Status(ctx context.Context) (Status, error)
	// Protect returns once connected; the first copy runs on
	// (Status.State = copying, then protected).
	Protect(ctx context.Context, p Protection) error
	// Unprotect closes the stream; the RAM stays served.
	Unprotect(ctx context.Context) error
	// SetRate changes the bandwidth share (bytes/s; 0 = unlimited).
	SetRate(ctx context.Context, bytesPerSec float64) error
	// Notice records a termination notice (a zero deadline withdraws it): the cap tightens towards
	// deadline.
	Notice(ctx context.Context, deadline time.Time) error
	// Sync flushes every dirty page to the backup (VM paused or not); it
	// waits for the first copy.
	Sync(ctx context.Context) (SyncReport, error)
	// Commit sends the device state and makes a restorable commit,
	// durable on return.
	Commit(ctx context.Context, state []byte) (CommitReport, error)
	// Shutdown unmounts and exits; only once QEMU has let go of the file.
	Shutdown(ctx context.Context) error
}
