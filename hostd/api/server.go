package api

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"hostd/dataplane/repo"
	"hostd/hostd/connector"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/hostd/swap"
	"hostd/hostd/valid"
	"hostd/hostd/vm"
	"hostd/xen"
)

// OpenAPI is the API's contract, served at GET /v1/openapi.yaml.
//
//go:embed openapi.yaml
var OpenAPI []byte

// HostInfo is the body of GET /v1/host.
type HostInfo struct {
	xen.HostInfo
	Version   string         `json:"version"`
	Roles     []string       `json:"roles"`
	Dataplane *DataplaneInfo `json:"dataplane,omitempty"`
	Backup    *BackupInfo    `json:"backup,omitempty"`
	Repo      *repo.Status   `json:"repo,omitempty"`
	// WarmSlots are the configured warm slots for restores and how many
	// of each are ready.
	WarmSlots []protect.SlotStatus `json:"warm_slots,omitempty"`
}

// RepoInfo is the repo role, when this hostd plays it.
type RepoInfo struct {
	Listen string
	Server *repo.Server
}

// RepoStatus is the body of GET /v1/repo.
type RepoStatus struct {
	Listen string `json:"listen"`
	repo.Status
}

// BackupInfo describes the backup role, when this hostd plays it.
type BackupInfo struct {
	Listen string `json:"listen"`
	Dir    string `json:"dir"`
}

// DataplaneInfo describes the connector dataplane, when one runs.
type DataplaneInfo struct {
	Backend  string `json:"backend"`
	Underlay string `json:"underlay"`
	MTU      int    `json:"mtu"` // inner MTU of every connector
}

// Deps are what the API drives.
type Deps struct {
	VMs        *vm.Manager
	Jobs       *jobs.Manager
	Events     *events.Broker
	Hypervisor xen.Hypervisor
	Connectors *connector.Manager
	Protection *protect.Manager // nil: no memory plane (501)
	Dataplane  *DataplaneInfo   // nil: no dataplane
	Backup     *BackupInfo      // nil: not a backup
	Repo       *RepoInfo        // nil: not a repository
	Swap       *swap.Manager
	Version    string
	Roles      []string
	// Registry receives the API's own metrics; Gatherer is served on /metrics.
	Registry prometheus.Registerer
	Gatherer prometheus.Gatherer
	Log      *slog.Logger
}

// Server is the HTTP side of hostd.
type Server struct {
	d     Deps
	mux   *http.ServeMux
	gid   int    // hostd group, -1 if none
	group string // its name, for messages
	reqs  *prometheus.CounterVec
	lat   *prometheus.HistogramVec
	http  *http.Server
	paths map[string]bool // paths that already have a 405 fallback
	// Routes lists "METHOD /path" patterns, for the OpenAPI test.
	Routes []string
}

// New builds the router. group names the group allowed besides root.
func New(d Deps, group string) (*Server, error) {
	s := &Server{d: d, mux: http.NewServeMux(), gid: -1, group: group, paths: make(map[string]bool)}
	if group != "" {
		if g, err := user.LookupGroup(group); err == nil {
			s.gid, _ = strconv.Atoi(g.Gid)
		} else {
			d.Log.Warn("API group does not exist; the socket is for root only", "group", group)
		}
	}
	s.reqs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "hostd_api_requests_total", Help: "API requests by route and status code.",
	}, []string{"route", "code"})
	s.lat = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "hostd_api_request_duration_seconds", Help: "API request latency by route.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
	}, []string{"route"})
	if d.Registry != nil {
		if err := d.Registry.Register(s.reqs); err != nil {
			return nil, fmt.Errorf("api: register metrics: %w", err)
		}
		if err := d.Registry.Register(s.lat); err != nil {
			return nil, fmt.Errorf("api: register metrics: %w", err)
		}
	}

	s.route("GET /v1/host", s.getHost)
	s.route("GET /v1/openapi.yaml", s.getOpenAPI)
	s.route("GET /v1/jobs", s.listJobs)
	s.route("GET /v1/jobs/{id}", s.getJob)
	s.route("GET /v1/events", s.streamEvents)
	if d.Gatherer != nil {
		s.route("GET /metrics", promhttp.HandlerFor(d.Gatherer, promhttp.HandlerOpts{}).ServeHTTP)
	}
	s.route("GET /v1/repo", s.getRepo)
	if d.VMs != nil {
		s.hostRoutes()
	}
	// Anything else: a JSON 404 rather than the mux's plain text, and for
	// peers allowed to know which routes exist only.
	s.mux.Handle("/", s.wrap("other", func(w http.ResponseWriter, r *http.Request) {
		writeErrorCode(w, http.StatusNotFound, "no_route", fmt.Sprintf("no route %s %s (see GET /v1/openapi.yaml)", r.Method, r.URL.Path))
	}))
	return s, nil
}

// hostRoutes are the host role's: VMs, connectors, protection.
func (s *Server) hostRoutes() {
	s.route("GET /v1/vms", s.listVMs)
	s.route("POST /v1/vms", s.createVM)
	s.route("GET /v1/vms/{name}", s.getVM)
	s.route("DELETE /v1/vms/{name}", s.deleteVM)
	s.route("POST /v1/vms/{name}/start", s.startVM)
	s.route("POST /v1/vms/{name}/shutdown", s.shutdownVM)
	s.route("POST /v1/vms/{name}/destroy", s.destroyVM)
	s.route("GET /v1/vms/{name}/console", s.console)
	s.route("GET /v1/vms/{name}/stats", s.stats)
	s.route("GET /v1/connectors", s.listConnectors)
	s.route("POST /v1/connectors", s.createConnector)
	s.route("GET /v1/connectors/{id}", s.getConnector)
	s.route("PUT /v1/connectors/{id}", s.updateConnector)
	s.route("DELETE /v1/connectors/{id}", s.deleteConnector)
	s.route("GET /v1/connectors/{id}/stats", s.connectorStats)
	s.route("GET /v1/protection", s.listProtection)
	s.route("PUT /v1/vms/{name}/protection", s.putProtection)
	s.route("GET /v1/vms/{name}/protection", s.getProtection)
	s.route("DELETE /v1/vms/{name}/protection", s.deleteProtection)
	s.route("POST /v1/vms/{name}/evacuate", s.evacuateVM)
	s.route("POST /v1/vms/{name}/epoch", s.epochVM)
	s.route("POST /v1/host/evacuate", s.evacuateHost)
	s.route("PUT /v1/vms/{name}/memory", s.putMemory)
	s.route("GET /v1/swap", s.listSwap)
	s.route("PUT /v1/vms/{name}/swap", s.putSwap)
	s.route("GET /v1/vms/{name}/swap", s.getSwap)
	s.route("DELETE /v1/vms/{name}/swap", s.deleteSwap)
	// No 405 fallback here: it would clash with GET /v1/vms/{name} (other
	// methods on this path reach the VM routes and get their answers).
	s.routeOnly("POST /v1/vms/restore", s.restoreVM)
}

// route registers h for pattern, a JSON 405 for the path's other methods,
// and wraps h with the credential check and metrics.
func (s *Server) route(pattern string, h http.HandlerFunc) {
	s.Routes = append(s.Routes, pattern)
	_, path, _ := strings.Cut(pattern, " ")
	s.mux.Handle(pattern, s.wrap(path, h))
	// One method-less pattern per path catches the other methods (the mux
	// prefers the more specific method patterns).
	if !s.paths[path] {
		s.paths[path] = true
		s.mux.Handle(path, s.wrap(path, func(w http.ResponseWriter, r *http.Request) {
			writeErrorCode(w, http.StatusMethodNotAllowed, "method_not_allowed",
				fmt.Sprintf("%s is not allowed on %s (see GET /v1/openapi.yaml)", r.Method, r.URL.Path))
		}))
	}
}

// routeOnly registers h for pattern without the 405 fallback of route.
func (s *Server) routeOnly(pattern string, h http.HandlerFunc) {
	s.Routes = append(s.Routes, pattern)
	_, path, _ := strings.Cut(pattern, " ")
	s.mux.Handle(pattern, s.wrap(path, h))
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(c int) { w.code = c; w.ResponseWriter.WriteHeader(c) }
func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// wrap checks the peer's credentials and the {name} in the path (a VM's
// name, checked once here for every route, before any handler runs), and
// counts the request.
func (s *Server) wrap(route string, h http.HandlerFunc) http.Handler {
	named := strings.Contains(route, "{name}")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		t0 := time.Now()
		if err := valid.VMName(r.PathValue("name")); named && err != nil {
			writeError(sw, fmt.Errorf("%s %s: %w", r.Method, route, err))
		} else {
			h(sw, r)
		}
		s.lat.WithLabelValues(route).Observe(time.Since(t0).Seconds())
		s.reqs.WithLabelValues(route, strconv.Itoa(sw.code)).Inc()
	})
}

// Handler is the whole API: every request, whatever its path, is first
// checked for the peer's credentials (403 for anyone neither root nor in
// the hostd group, on the catch-all 404 and 405 too), then for a clean path
// (ServeMux would redirect "/v1/vms/../x"; hostd refuses it), then routed.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := r.Context().Value(credKey{}).(peer)
		if ok, why := p.allowed(s.gid, s.group); !ok {
			writeErrorCode(w, http.StatusForbidden, "forbidden", why)
			s.reqs.WithLabelValues("any", "403").Inc()
			return
		}
		if r.URL.Path == "" || path.Clean(r.URL.Path) != r.URL.Path || strings.Contains(r.URL.Path, "\x00") {
			writeError(w, fmt.Errorf("%w: path %q is not clean (no \".\", \"..\" or empty segments)", errBadRequest, r.URL.Path))
			s.reqs.WithLabelValues("any", "400").Inc()
			return
		}
		s.mux.ServeHTTP(w, r)
	})
}

// Listen creates the socket at path (mode 0660, owned by the hostd group)
// and serves until ctx ends or Shutdown is called. A stale socket file left
// by a killed daemon is removed first; a live one (another daemon) is not.
func (s *Server) Listen(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: another process is serving this socket (another hostd?)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("listen on %s: remove stale socket: %w", path, err)
	}
	if err := s.runDir(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen on %s: chmod: %w", path, err)
	}
	if s.gid >= 0 {
		if err := os.Chown(path, 0, s.gid); err != nil {
			l.Close()
			return nil, fmt.Errorf("listen on %s: chown: %w", path, err)
		}
	}
	return l, nil
}

// runDir makes sure the socket's directory exists and that the hostd group
// can reach the socket in it: root-owned, group hostd, 0750 (group members
// may enter, not write). It applies to a directory hostd creates and to one
// systemd's RuntimeDirectory= or tmpfiles made, whatever group it got.
func (s *Server) runDir(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	if s.gid < 0 {
		return nil
	}
	if err := os.Chown(dir, 0, s.gid); err != nil {
		return fmt.Errorf("give %s to group %s: %w", dir, s.group, err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if st.Mode().Perm()&0o050 != 0o050 {
		if err := os.Chmod(dir, st.Mode().Perm()|0o050); err != nil {
			return fmt.Errorf("let group %s enter %s: %w", s.group, dir, err)
		}
	}
	return nil
}

// Serve serves on l until Shutdown.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.http = &http.Server{
		Handler:           s.Handler(),
		ConnContext:       connContext,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ReadHeaderTimeout: 10 * time.Second,
	}
	if err := s.http.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve API: %w", err)
	}
	return nil
}

// Shutdown stops accepting requests and waits for running ones (event
// streams end with the daemon's context).
func (s *Server) Shutdown(ctx context.Context) error {
	if s.http == nil {
		return nil
	}
	return s.http.Shutdown(ctx)
}

func (s *Server) getHost(w http.ResponseWriter, r *http.Request) {
	info := HostInfo{Version: s.d.Version, Roles: s.d.Roles, Dataplane: s.d.Dataplane, Backup: s.d.Backup}
	if s.d.Repo != nil {
		st := s.d.Repo.Server.Status()
		info.Repo = &st
	}
	if s.d.Hypervisor != nil {
		h, err := s.d.Hypervisor.Host(r.Context())
		if err != nil {
			writeError(w, fmt.Errorf("host info: %w", err))
			return
		}
		info.HostInfo = h
	}
	if s.d.Protection != nil {
		info.WarmSlots = s.d.Protection.Slots()
	}
	writeJSON(w, http.StatusOK, info)
}

func (s *Server) getOpenAPI(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	_, _ = w.Write(OpenAPI)
}

func (s *Server) listVMs(w http.ResponseWriter, r *http.Request) {
	vms, err := s.d.VMs.List(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, vms)
}

func (s *Server) createVM(w http.ResponseWriter, r *http.Request) {
	var req vm.Request
	if err := decode(r, &req, false); err != nil {
		writeError(w, fmt.Errorf("create VM: %w", err))
		return
	}
	v, err := s.d.VMs.Create(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/vms/"+v.Name)
	writeJSON(w, http.StatusCreated, v)
}

func (s *Server) getVM(w http.ResponseWriter, r *http.Request) {
	v, err := s.d.VMs.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Server) deleteVM(w http.ResponseWriter, r *http.Request) {
	if err := s.d.VMs.Delete(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) startVM(w http.ResponseWriter, r *http.Request) {
	if err := decode(r, &struct{}{}, true); err != nil {
		writeError(w, err)
		return
	}
	v, err := s.d.VMs.Start(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Server) destroyVM(w http.ResponseWriter, r *http.Request) {
	if err := decode(r, &struct{}{}, true); err != nil {
		writeError(w, err)
		return
	}
	v, err := s.d.VMs.Destroy(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// ShutdownRequest is the optional body of POST /v1/vms/{name}/shutdown.
type ShutdownRequest struct {
	TimeoutSeconds float64 `json:"timeout_s,omitempty"`
}

func (s *Server) shutdownVM(w http.ResponseWriter, r *http.Request) {
	var req ShutdownRequest
	if err := decode(r, &req, true); err != nil {
		writeError(w, fmt.Errorf("shutdown VM: %w", err))
		return
	}
	if req.TimeoutSeconds < 0 || req.TimeoutSeconds > 3600 {
		writeError(w, fmt.Errorf("shutdown VM: %w: timeout_s must be between 0 (default) and 3600", errBadRequest))
		return
	}
	j, err := s.d.VMs.Shutdown(r.Context(), r.PathValue("name"), time.Duration(req.TimeoutSeconds*float64(time.Second)))
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID)
	writeJSON(w, http.StatusAccepted, j)
}

func (s *Server) console(w http.ResponseWriter, r *http.Request) {
	n := 50
	if q := r.URL.Query().Get("lines"); q != "" {
		v, err := strconv.Atoi(q)
		if err != nil || v < 0 || v > 100000 {
			writeError(w, fmt.Errorf("console: %w: lines must be a number from 0 (all) to 100000", errBadRequest))
			return
		}
		n = v
	}
	out, err := s.d.VMs.Console(r.PathValue("name"), n)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(out)
}

func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	st, err := s.d.VMs.Stats(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) listJobs(w http.ResponseWriter, r *http.Request) {
	js, err := s.d.Jobs.List()
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, js)
}

func (s *Server) getJob(w http.ResponseWriter, r *http.Request) {
	j, err := s.d.Jobs.Get(r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, j)
}

// streamEvents writes one JSON event per line until the client goes away
// or the daemon stops. A heartbeat comment line is not JSON, so none is
// sent; clients detect a dead daemon by the connection closing.
func (s *Server) streamEvents(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		writeErrorCode(w, http.StatusInternalServerError, "internal", "streaming unsupported")
		return
	}
	ch := s.d.Events.Subscribe(r.Context(), 256)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	enc := json.NewEncoder(w)
	for e := range ch {
		if err := enc.Encode(e); err != nil {
			return
		}
		flusher.Flush()
	}
}
