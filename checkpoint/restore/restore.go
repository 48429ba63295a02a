package restore

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"

	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/memfs"
	"hostd/checkpoint/pageset"
	"hostd/checkpoint/wire"
)

const pageSize = wire.PageSize

// Errors a read of a refused page wraps.
var (
	// ErrCorrupt: the backup's stored copy of a page fails its checksum.
	ErrCorrupt = errors.New("page corrupt at the backup")
	// ErrMoved: the backup's copy of a page is newer than the restore
	// point (another writer committed to the same VM id).
	ErrMoved = errors.New("page at the backup is newer than the restore point")
)

// Event types.
const (
	EventUnreachable = "restore.backup_unreachable"
	EventBack        = "restore.backup_back"
	EventCorrupt     = "restore.corrupt_page"
	EventMoved       = "restore.page_moved"
	EventResident    = "restore.resident"
	// EventRefused: the backup answers but no longer holds the VM or the
	// restore point (once per outage). Reads of missing pages wait, as
	// through any outage, until it holds them again or their context ends.
	EventRefused = "restore.backup_refused"
)

// Event is something a restore reports: an outage and its end, a refused
// page, full residency.
type Event struct {
	Type  string    `json:"type"`
	Time  time.Time `json:"time"`
	ID    string    `json:"id"`
	Epoch uint64    `json:"epoch"`
	Page  int64     `json:"page,omitempty"`  // refused page
	Bytes int64     `json:"bytes,omitempty"` // resident: bytes brought
	// Elapsed: the outage's length (backup_back), time since Open
	// (resident).
	Elapsed time.Duration `json:"elapsed,omitempty"`
	Error   string        `json:"error,omitempty"`
}

// Config describes a restore.
type Config struct {
	Backup string      // backup server host:port
	TLS    *tls.Config // pki.ClientConfig: TLS 1.3 with this host's certificate
	ID     string      // the VM's id at the backup
	// Epoch is the restore point; 0: the backup's latest. The backup keeps
	// only its newest image, so another epoch is refused with an error
	// that says which one it holds.
	Epoch uint64
	Size  int64 // guest RAM bytes; must equal the backup's image size
	// CacheFile is a local file (created or truncated, sparse) that holds
	// every page brought so far. It must stay as long as the VM runs.
	CacheFile string
	// PrefetchRate bounds the prefetcher in bytes/s (0: unlimited).
	PrefetchRate float64
	Logger       *slog.Logger
	// OnEvent, if set, is called for each Event, from the goroutine that
	// saw it, without locks held.
	OnEvent func(Event)

	// Tuning; zero values take the defaults.
	// FaultChunk: a fault fetches its own pages and, without waiting for
	// them, the rest of the aligned FaultChunk around them; default one
	// page (off). Measured here (checkpoint/bench): 64 KiB around raised a
	// page fault's median from about 80 to 150-190 us on 2 busy cores, a
	// gain only when the guest touches neighbours before the prefetcher
	// brings them.
	FaultChunk    int64
	PrefetchChunk int64 // bytes per prefetch step; 4 MiB
	FullChunk     int64 // bytes per Full step; 4 MiB (wire.MaxData)
	PrefetchDepth int   // prefetch/Full steps in flight; 4
	// AttemptTimeout bounds one connect, and the wait for one answer while
	// fetches are outstanding (so a prefetch chunk must arrive at
	// PrefetchChunk/AttemptTimeout bytes/s or better, 400 KB/s by default);
	// 10 s.
	AttemptTimeout time.Duration
	MaxBackoff     time.Duration // longest wait between attempts; 2 s
}

// Status is a restore's progress.
type Status struct {
	ID    string `json:"id"`
	Epoch uint64 `json:"epoch"`
	// TotalBytes are the restore point's non-zero bytes: what must be
	// brought; ZeroBytes the rest, produced locally.
	TotalBytes int64 `json:"total_bytes"`
	ZeroBytes  int64 `json:"zero_bytes"`
	// PresentBytes of TotalBytes are in the cache file, or were
	// superseded by the guest's own writes before they came.
	PresentBytes  int64 `json:"present_bytes"`
	FullyResident bool  `json:"fully_resident"`
	// Faults are reads memfs asked of the Source (the prefetcher's own
	// preloads not counted); RemoteFaults those that waited for the
	// backup, with their service time percentiles.
	Faults       int64         `json:"faults"`
	RemoteFaults int64         `json:"remote_faults"`
	FaultP50     time.Duration `json:"fault_p50"`
	FaultP99     time.Duration `json:"fault_p99"`
	FaultMax     time.Duration `json:"fault_max"`
	// FetchedBytes crossed the wire; PrefetchedBytes of them by the
	// prefetcher or Full; PreloadedBytes were read into the page cache
	// ahead of the guest.
	FetchedBytes    int64 `json:"fetched_bytes"`
	PrefetchedBytes int64 `json:"prefetched_bytes"`
	PreloadedBytes  int64 `json:"preloaded_bytes"`
	// StoresSkipped counts pages the prefetcher did not push because the
	// guest had them already (read or written).
	StoresSkipped int64 `json:"stores_skipped"`
	CorruptPages  int64 `json:"corrupt_pages"` // refused: corrupt or moved
	Outages       int64 `json:"outages"`
	Unreachable   bool  `json:"unreachable"`
}

// maxSamples bounds the fault latency reservoir.
const maxSamples = 1 << 16

// Restorer serves one VM's restore. Its methods are safe for concurrent
// use.
type Restorer struct {
	cfg   Config
	log   *slog.Logger
	epoch uint64
	state []byte
	cache *os.File
	t0    time.Time
	// ctx ends at Close: background fetches (the chunk around a fault)
	// live within it.
	ctx    context.Context
	cancel context.CancelFunc
	bg     sync.WaitGroup

	nonzero *pageset.Set // pages the restore must bring
	total   int64        // pages in nonzero
	runs    []wire.Run   // the map, ascending

	fault, bulk *link

	mu         sync.Mutex
	present    *pageset.Set // in the cache file
	superseded *pageset.Set // written by the guest before they came
	done       int64        // present + superseded pages
	bad        map[int64]error
	inflight   map[int64]*flight // by page
	preloads   map[step]int      // windows being preloaded
	resident   bool
	residentCh chan struct{}
	st         Status
	samples    []time.Duration
	nSamples   int64
	outageT0   time.Time // zero while reachable
	refusedNow bool      // the refusal of the current outage was reported
	closed     bool
}

// Open connects to the backup, reads the restore point's page map and
// device state, and prepares the cache file. It fails at once if the
// backup is unreachable or refuses (no such VM or restore point): the
// caller may retry.
func Open(ctx context.Context, cfg Config) (*Restorer, error) {
	op := fmt.Sprintf("open restore of %s from %s", cfg.ID, cfg.Backup)
	if cfg.Size <= 0 || cfg.Size%pageSize != 0 {
		return nil, fmt.Errorf("%s: size %d not a positive multiple of %d", op, cfg.Size, pageSize)
	}
	if cfg.CacheFile == "" {
		return nil, fmt.Errorf("%s: no cache file", op)
	}
	setDefaults(&cfg)
	if cfg.FaultChunk%pageSize != 0 || cfg.PrefetchChunk%pageSize != 0 || cfg.FullChunk%pageSize != 0 ||
		cfg.FaultChunk > wire.MaxData || cfg.PrefetchChunk > wire.MaxData || cfg.FullChunk > wire.MaxData {
		return nil, fmt.Errorf("%s: chunk sizes must be page multiples up to %d", op, wire.MaxData)
	}
	l := cfg.Logger
	if l == nil {
		l = slog.Default()
	}
	rctx, rcancel := context.WithCancel(context.WithoutCancel(ctx))
	r := &Restorer{cfg: cfg, log: l.With("component", "restore", "vm", cfg.ID), t0: time.Now(), ctx: rctx, cancel: rcancel,
		bad: map[int64]error{}, inflight: map[int64]*flight{}, preloads: map[step]int{}, residentCh: make(chan struct{})}
	c, err := backupclient.DialRestore(ctx, r.dialConfig(cfg.Epoch, false))
	if err != nil {
		rcancel()
		return nil, fmt.Errorf("restore: %w", err) // says what and where already
	}
	info := c.Info()
	r.epoch = info.Epoch
	if r.state, err = c.FetchState(ctx); err != nil {
		rcancel()
		c.Close()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	f, err := os.OpenFile(cfg.CacheFile, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		if err = f.Truncate(cfg.Size); err != nil {
			f.Close()
		}
	}
	if err != nil {
		rcancel()
		c.Close()
		return nil, fmt.Errorf("%s: cache file: %w", op, err)
	}
	r.cache = f
	pages := cfg.Size / pageSize
	r.nonzero, r.present, r.superseded = pageset.New(pages), pageset.New(pages), pageset.New(pages)
	r.runs = info.Runs
	for _, x := range info.Runs {
		r.nonzero.AddRange(int64(x.First), int64(x.Count))
	}
	r.total = info.Pages
	r.st = Status{ID: cfg.ID, Epoch: r.epoch, TotalBytes: r.total * pageSize, ZeroBytes: cfg.Size - r.total*pageSize}
	r.fault = &link{r: r, name: "fault", conn: c}
	r.bulk = &link{r: r, name: "bulk"}
	r.log.Info("restore open", "epoch", r.epoch, "backup_committed", info.Committed, "bytes_to_bring", r.total*pageSize,
		"state_bytes", len(r.state), "runs", len(info.Runs))
	return r, nil
}

func setDefaults(c *Config) {
	if c.FaultChunk == 0 {
		c.FaultChunk = pageSize
	}
	if c.PrefetchChunk == 0 {
		c.PrefetchChunk = 4 << 20
	}
	if c.FullChunk == 0 {
		c.FullChunk = wire.MaxData
	}
	if c.PrefetchDepth == 0 {
		c.PrefetchDepth = 4
	}
	if c.AttemptTimeout == 0 {
		c.AttemptTimeout = 10 * time.Second
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = 2 * time.Second
	}
}

func (r *Restorer) dialConfig(epoch uint64, resume bool) backupclient.RestoreConfig {
	return backupclient.RestoreConfig{Addr: r.cfg.Backup, TLS: r.cfg.TLS, VMID: r.cfg.ID, Epoch: epoch, Resume: resume,
		ImageSize: r.cfg.Size, DialTimeout: r.cfg.AttemptTimeout, StallTimeout: r.cfg.AttemptTimeout, Logger: r.cfg.Logger}
}

// State is the restore point's device state (for QEMU's migrate-incoming).
func (r *Restorer) State() []byte { return r.state }

// Epoch is the restore point being restored.
func (r *Restorer) Epoch() uint64 { return r.epoch }

// Source is what memfs.Mount takes to serve the RAM file from the restore.
func (r *Restorer) Source() memfs.Source { return source{r} }

// Resident is closed once every page is in the cache file (fsynced): the
// VM no longer needs the backup.
func (r *Restorer) Resident() <-chan struct{} { return r.residentCh }

// Status returns the progress so far.
func (r *Restorer) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.st
	st.PresentBytes = r.done * pageSize
	st.FullyResident = r.resident
	st.Unreachable = !r.outageT0.IsZero()
	if len(r.samples) > 0 {
		s := slices.Clone(r.samples)
		slices.Sort(s)
		st.FaultP50 = s[len(s)/2]
		st.FaultP99 = s[min(len(s)-1, len(s)*99/100)]
	}
	return st
}

// Close ends the restore's connections and closes the cache file. The
// Source must no longer be used (unmount first). The cache file stays for
// the caller to remove.
func (r *Restorer) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.fault.close()
	r.bulk.close()
	r.bg.Wait()
	return r.cache.Close()
}

func (r *Restorer) emit(e Event) {
	e.Time, e.ID, e.Epoch = time.Now(), r.cfg.ID, r.epoch
	switch e.Type {
	case EventUnreachable, EventCorrupt, EventMoved, EventRefused:
		r.log.Warn(e.Type, "page", e.Page, "err", e.Error)
	default:
		r.log.Info(e.Type, "elapsed", e.Elapsed, "bytes", e.Bytes)
	}
	if r.cfg.OnEvent != nil {
		r.cfg.OnEvent(e)
	}
}

// sample records a remote fault's service time (reservoir of maxSamples).
func (r *Restorer) sampleLocked(d time.Duration) {
	r.nSamples++
	r.st.FaultMax = max(r.st.FaultMax, d)
	if len(r.samples) < maxSamples {
		r.samples = append(r.samples, d)
		return
	}
	if i := rand.Int64N(r.nSamples); i < maxSamples {
		r.samples[i] = d
	}
}

// reachable ends an outage, if one is on.
func (r *Restorer) reachable() {
	r.mu.Lock()
	t0 := r.outageT0
	r.outageT0, r.refusedNow = time.Time{}, false
	r.mu.Unlock()
	if !t0.IsZero() {
		r.emit(Event{Type: EventBack, Elapsed: time.Since(t0)})
	}
}

// refused reports the backup's refusal, once per outage.
func (r *Restorer) refused(err error) {
	r.mu.Lock()
	first := !r.refusedNow
	r.refusedNow = true
	r.mu.Unlock()
	if first {
		r.emit(Event{Type: EventRefused, Error: err.Error()})
	}
}

// unreachable starts an outage, if none is on.
func (r *Restorer) unreachable(err error) {
	r.mu.Lock()
	start := r.outageT0.IsZero()
	if start {
		r.outageT0 = time.Now()
		r.st.Outages++
	}
	r.mu.Unlock()
	if start {
		r.emit(Event{Type: EventUnreachable, Error: err.Error()})
	}
}

// byRecency orders the map for the prefetcher: most recently written
// first (the guest is likeliest to touch those soon), ascending within an
// epoch so the backup reads sequentially.
func byRecency(runs []wire.Run) []wire.Run {
	s := slices.Clone(runs)
	slices.SortStableFunc(s, func(a, b wire.Run) int { return cmp.Compare(b.Epoch, a.Epoch) })
	return s
}
