package memserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/memfs"
)

// unprotectedCap is the dirty cap while nothing is streamed: writeback is
// free then (the sink discards), so the cap only keeps the kernel's
// writeback in reasonable batches.
const unprotectedCap = 64 << 20

// queueBytes is memfs's write queue; part of every cap (flush.Params.MinCap).
const queueBytes = 8 << 20

// server is one running memory server: the mount, its switchable sink,
// the protection if any, and the control API.
type server struct {
	cfg  Config
	log  *slog.Logger
	ctx  context.Context // ends when the server starts shutting down
	stop context.CancelFunc
	fs   *memfs.FS
	ram  ramFile // the RAM file, read-only: pread for the first copy and resyncs
	sink *sink
	// restore is set when the server started from a backup's restore
	// point, or once a slot is claimed (then under mu; read it with
	// restoring()).
	restore *restoring
	// slot is the switchable Source of a warm slot (nil otherwise).
	slot *slotSource
	// prefetching: the lazy restore's prefetcher was started.
	prefetching bool

	// opMu serialises the operations that change what the server does
	// (protect, unprotect, sync, commit, shutdown). Status, SetRate and
	// Notice do not take it: they must answer while a long Sync runs.
	opMu sync.Mutex

	mu      sync.Mutex
	prot    *protection // nil while unprotected
	rate    float64     // the bandwidth share, bytes/s
	lastBW  float64     // bandwidth measured by the last protection
	closing bool
	done    chan struct{} // closed once torn down: Run returns
}

// Run serves cfg.VM's RAM file and the control API until ctx ends or a
// Shutdown request comes, then stops streaming, unmounts and removes the
// socket. It is the body of the `memserve` process (Main); it returns
// only once the mount is gone.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	op := "memory server of VM " + cfg.VM
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if log == nil {
		log = slog.Default()
	}
	log = log.With("vm", cfg.VM)
	if err := prepareMountPoint(cfg.Dir); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := shareMountPoint(cfg.Dir); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer unix.Unmount(cfg.Dir, unix.MNT_DETACH) // the shared bind, once the mount is gone
	ln, err := listenControl(cfg.Socket)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer os.Remove(cfg.Socket)
	defer ln.Close()

	sctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	s := &server{cfg: cfg, log: log, ctx: sctx, stop: stop, sink: newSink(), done: make(chan struct{})}
	opts := memfs.Options{
		Size: cfg.Size, Sink: s.sink, Source: memfs.ZeroSource{},
		QueueBytes: queueBytes, DirtyCap: unprotectedCap, Logger: log,
	}
	defer func() {
		if rs := s.restoring(); rs != nil {
			rs.r.Close()
		}
	}()
	if cfg.Restore != nil {
		if s.restore, err = openRestore(sctx, cfg, log); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		opts.Source = s.restore.r.Source()
		// A lazy fault should wait for its own page only; the
		// prefetcher brings the rest in large chunks.
		opts.ReadAhead = memfs.PageSize
	}
	if cfg.Slot {
		// A slot only ever serves a lazy restore: read-ahead as above.
		s.slot = &slotSource{src: memfs.ZeroSource{}}
		opts.Source, opts.ReadAhead = s.slot, memfs.PageSize
	}
	s.fs, err = memfs.Mount(sctx, cfg.Dir, opts)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if s.restore != nil && cfg.Restore.Mode == "lazy" && !cfg.Restore.DeferPrefetch {
		s.startPrefetch()
	}
	// Reads of it are FUSE requests this process serves on other
	// goroutines: safe for system calls, never for faults on a mapping
	// (see memfs's doc).
	s.ram = ramFile{path: s.fs.Path()}

	hs := &http.Server{
		Handler:           s.routes(),
		BaseContext:       func(net.Listener) context.Context { return sctx },
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- hs.Serve(ln) }()
	log.Info("memory server ready", "ram", s.fs.Path(), "size", cfg.Size, "socket", cfg.Socket, "pid", os.Getpid())

	var result error
	select {
	case <-ctx.Done():
		log.Info("stopping", "why", context.Cause(ctx))
		s.teardown()
	case <-s.done:
	case err := <-serveErr:
		result = fmt.Errorf("%s: control socket: %w", op, err)
		log.Error("control socket failed; stopping", "err", err)
		s.teardown()
	}
	// The Shutdown request that got us here is still writing its answer:
	// let it (and any other answer) finish, briefly.
	sd, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	hs.Shutdown(sd)
	log.Info("memory server stopped")
	return result
}

func (c Config) validate() error {
	switch {
	case c.VM == "":
		return errors.New("config: no vm name")
	case c.Dir == "":
		return errors.New("config: no mount directory")
	case c.Socket == "":
		return errors.New("config: no control socket")
	case c.Size <= 0 || c.Size%memfs.PageSize != 0:
		return fmt.Errorf("config: size %d not a positive multiple of %d", c.Size, memfs.PageSize)
	case c.Slot && c.Restore != nil:
		return errors.New("config: a slot is claimed for a restore later; it cannot start with one")
	}
	return nil
}

// prepareMountPoint creates dir, or clears what a crashed memory server
// left on it: a FUSE mount whose server died answers ENOTCONN and must be
// detached before anything can be mounted there. A live mount is refused:
// another memory server may be serving a guest from it.
func prepareMountPoint(dir string) error {
	op := "prepare mount point " + dir
	// statfs, not stat: FUSE answers stat from its attribute cache even
	// when the server is gone, statfs always asks it.
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); errors.Is(err, unix.ENOTCONN) {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("%s: detach the dead mount a crashed server left: %w", op, err)
		}
	}
	var st unix.Stat_t
	err := unix.Stat(dir, &st)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	var parent unix.Stat_t
	if err := unix.Stat(filepath.Dir(filepath.Clean(dir)), &parent); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if parent.Dev != st.Dev {
		return fmt.Errorf("%s: something is mounted there already (another memory server?); unmount it first", op)
	}
	return nil
}

// shareMountPoint makes dir a shared mount of its own (a bind of itself)
// before the RAM file is mounted on it. libvirt starts each QEMU in a mount
// namespace of its own, a copy of the host's: a QEMU started while this
// server runs holds a copy of the RAM mount, and where the parent mount is
// private (here "/" is) the unmount at teardown does not reach that copy.
// The copy keeps the FUSE connection alive, so the unmount never completes
// and the server never exits (seen: a slot's QEMU started while a restored
// VM ran held that VM's mount). Under a shared parent the unmount
// propagates into the copies (they are its slaves). A bind a killed server
// left is replaced (prepareMountPoint refused anything else mounted there).
func shareMountPoint(dir string) error {
	op := "share mount point " + dir
	for range 8 {
		if unix.Unmount(dir, unix.MNT_DETACH) != nil {
			break // no (more) leftover binds
		}
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("%s: bind: %w", op, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		return fmt.Errorf("%s: make shared: %w", op, err)
	}
	return nil
}

// listenControl listens on the control socket (mode 0600). A socket file
// nobody answers on is a crashed server's and is removed; one that answers
// belongs to a live server and is refused.
func listenControl(path string) (net.Listener, error) {
	op := "listen on control socket " + path
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: a memory server answers there already", op)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("%s: remove stale socket: %w", op, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	// Root only: whoever speaks here can read guest memory's fate. The
	// directory is hostd's private one, so the moment between listen and
	// chmod exposes nothing.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return ln, nil
}

// teardown stops streaming and unmounts; the first call does the work.
func (s *server) teardown() {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		<-s.done
		return
	}
	s.closing = true
	s.mu.Unlock()
	defer close(s.done)
	// Cancelling first makes a running Sync or Commit return, so opMu
	// comes free.
	s.stop()
	s.opMu.Lock()
	defer s.opMu.Unlock()
	s.mu.Lock()
	p := s.prot
	s.prot = nil
	s.mu.Unlock()
	if p != nil {
		p.stop()
	}
	if err := s.fs.Unmount(); err != nil {
		// memfs detaches a busy mount; the guest's mapping then fails
		// once this process is gone. Shutdown is documented as "after
		// QEMU let go" for this reason.
		s.log.Error("unmount", "err", err)
	}
	// The shared bind under the mount goes too, before a Shutdown is
	// answered: whoever asked may reuse the directory at once.
	if err := unix.Unmount(s.cfg.Dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		s.log.Warn("unmount the shared bind", "dir", s.cfg.Dir, "err", err)
	}
}

// --- control API ---

// apiError carries the HTTP status an error is answered with.
type apiError struct {
	code int
	err  error
}

func (e *apiError) Error() string { return e.err.Error() }
func (e *apiError) Unwrap() error { return e.err }

func badRequest(err error) error  { return &apiError{http.StatusBadRequest, err} }
func conflict(err error) error    { return &apiError{http.StatusConflict, err} }
func badGateway(err error) error  { return &apiError{http.StatusBadGateway, err} }
func unavailable(err error) error { return &apiError{http.StatusServiceUnavailable, err} }

type errorBody struct {
	Error string `json:"error"`
}

// Paths of the control API.
const (
	pathStatus    = "/v1/status"
	pathProtect   = "/v1/protect"
	pathUnprotect = "/v1/unprotect"
	pathRate      = "/v1/rate"
	pathNotice    = "/v1/notice"
	pathSync      = "/v1/sync"
	pathCommit    = "/v1/commit"
	pathShutdown  = "/v1/shutdown"
)

type rateBody struct {
	Rate float64 `json:"rate"`
}

type noticeBody struct {
	Deadline time.Time `json:"deadline"`
}

// maxState bounds a device-state upload (QEMU's is under a megabyte for
// the guests measured; a few hundred MB would be a bug).
const maxState = 256 << 20

func (s *server) routes() http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern string, f func(*http.Request) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			v, err := f(r)
			w.Header().Set("Content-Type", "application/json")
			if err != nil {
				code := http.StatusInternalServerError
				var ae *apiError
				if errors.As(err, &ae) {
					code = ae.code
				}
				if code >= 500 {
					s.log.Warn("request failed", "path", r.URL.Path, "err", err)
				}
				w.WriteHeader(code)
				json.NewEncoder(w).Encode(errorBody{Error: err.Error()})
				return
			}
			if v == nil {
				v = struct{}{}
			}
			json.NewEncoder(w).Encode(v)
		})
	}
	handle("GET "+pathStatus, func(*http.Request) (any, error) { return s.status(), nil })
	s.restoreRoutes(mux, handle)
	handle("POST "+pathProtect, func(r *http.Request) (any, error) {
		var p Protection
		if err := decodeJSON(r, &p); err != nil {
			return nil, err
		}
		return nil, s.protect(r.Context(), p)
	})
	handle("POST "+pathUnprotect, func(*http.Request) (any, error) { return nil, s.unprotect() })
	handle("POST "+pathRate, func(r *http.Request) (any, error) {
		var b rateBody
		if err := decodeJSON(r, &b); err != nil {
			return nil, err
		}
		return nil, s.setRate(b.Rate)
	})
	handle("POST "+pathNotice, func(r *http.Request) (any, error) {
		var b noticeBody
		if err := decodeJSON(r, &b); err != nil {
			return nil, err
		}
		return nil, s.notice(b.Deadline)
	})
	handle("POST "+pathSync, func(r *http.Request) (any, error) { return s.sync(r.Context()) })
	handle("POST "+pathCommit, func(r *http.Request) (any, error) {
		state, err := io.ReadAll(io.LimitReader(r.Body, maxState+1))
		if err != nil {
			return nil, badRequest(fmt.Errorf("commit: read device state: %w", err))
		}
		if len(state) > maxState {
			return nil, badRequest(fmt.Errorf("commit: device state over %d bytes", maxState))
		}
		return s.commit(r.Context(), state)
	})
	handle("POST "+pathShutdown, func(*http.Request) (any, error) {
		s.teardown()
		return nil, nil
	})
	return mux
}

func decodeJSON(r *http.Request, v any) error {
	d := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return badRequest(fmt.Errorf("%s: request body: %w", r.URL.Path, err))
	}
	return nil
}

// protection returns the current protection, or a conflict error naming
// the operation that needs one.
func (s *server) protection(op string) (*protection, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil, unavailable(fmt.Errorf("%s: memory server of VM %s is shutting down", op, s.cfg.VM))
	}
	if s.prot == nil {
		return nil, conflict(fmt.Errorf("%s: VM %s is not protected (Protect first)", op, s.cfg.VM))
	}
	return s.prot, nil
}

// lockOp takes opMu unless the server is shutting down.
func (s *server) lockOp(op string) error {
	s.opMu.Lock()
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		s.opMu.Unlock()
		return unavailable(fmt.Errorf("%s: memory server of VM %s is shutting down", op, s.cfg.VM))
	}
	return nil
}

func (s *server) status() Status {
	now := time.Now()
	fst := s.fs.Stats()
	st := Status{
		VM: s.cfg.VM, PID: os.Getpid(), RAMPath: s.fs.Path(), Size: s.cfg.Size,
		State: StateUnprotected, BytesWrittenBack: fst.BytesWritten,
	}
	s.mu.Lock()
	p, rate := s.prot, s.rate
	s.mu.Unlock()
	st.Rate = rate
	if rs := s.restoring(); rs != nil {
		rs.fill(&st)
	}
	st.Slot = s.slot != nil && s.restoring() == nil
	if p == nil {
		st.Unflushed = s.unflushed()
		st.Cap = unprotectedCap
		return st
	}
	p.fill(now, &st)
	return st
}

// unflushed is the mount's memory not yet handed on: the bdi's dirty and
// under-writeback pages (debugfs) plus memfs's queue. Without debugfs the
// kernel's limit stands in for the bdi's part: the most it can be.
func (s *server) unflushed() int64 {
	fst := s.fs.Stats()
	queued := max(fst.BytesWritten-fst.BytesDelivered, 0)
	if n, ok := s.fs.BDI().Unflushed(); ok {
		return n + queued
	}
	if lim, err := s.fs.DirtyLimit(); err == nil {
		return lim + queued
	}
	return queued
}

func (s *server) setRate(r float64) error {
	if !(r >= 0) || r > 1e15 {
		return badRequest(fmt.Errorf("set rate: %v bytes/s is not a rate (0 = unlimited)", r))
	}
	s.mu.Lock()
	s.rate = r
	protected := s.prot != nil
	s.mu.Unlock()
	if protected {
		s.sink.setRate(r)
	}
	s.log.Info("rate set", "bytes_per_sec", r)
	return nil
}

func (s *server) notice(deadline time.Time) error {
	p, err := s.protection("termination notice")
	if err != nil {
		return err
	}
	now := time.Now()
	if deadline.IsZero() {
		// Withdrawn: an evacuation drill resumed the guest.
		if err := p.ctl.ClearNotice(now); err != nil {
			s.log.Warn("withdraw notice", "err", err)
		}
		p.wake()
		return nil
	}
	if !deadline.After(now) {
		return badRequest(fmt.Errorf("termination notice: deadline %s is not in the future", deadline.Format(time.RFC3339Nano)))
	}
	// An unmeetable deadline is still recorded (the cap is then as tight
	// as memfs allows); Status says degraded and why.
	if err := p.ctl.Notice(now, deadline); err != nil {
		s.log.Warn("termination notice: bound cannot be met", "deadline", deadline, "err", err)
	} else {
		s.log.Info("termination notice", "deadline", deadline)
	}
	p.wake()
	return nil
}
