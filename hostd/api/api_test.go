package api_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"hostd/hostd/api"
	"hostd/hostd/client"
	"hostd/hostd/config"
	"hostd/hostd/connector"
	"hostd/hostd/events"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/hostd/store"
	"hostd/hostd/swap"
	"hostd/hostd/vm"
	"hostd/xen/xentest"
)

// These tests drive the real server over a real unix socket; only the
// hypervisor is a fake, because what is under test is the API's handling
// of requests and errors, not booting.

type env struct {
	c    *client.Client
	fake *xentest.Fake
	srv  *api.Server
	sock string
	cfg  config.Config
}

func start(t *testing.T) *env { return startWith(t, envOpts{}) }

// envOpts add what some tests need: the memory plane's and swap's
// managers (full), TLS files named in the configuration (so requests get
// past the "not configured" check to the validation behind it), the API
// group, and the test's root directory.
type envOpts struct {
	full, tls bool
	group     string
	dir       string
}

func startWith(t testing.TB, o envOpts) *env {
	t.Helper()
	dir := o.dir
	if dir == "" {
		dir = t.TempDir()
	}
	cfg := config.Default()
	cfg.StateDir, cfg.RunDir = filepath.Join(dir, "state"), filepath.Join(dir, "run")
	cfg.API.Socket = filepath.Join(cfg.RunDir, "hostd.sock")
	// A kernel file that exists, so requests pass the manager's checks.
	cfg.Guest.Kernel = filepath.Join(dir, "vmlinuz")
	cfg.Guest.Initrd = ""
	if err := os.WriteFile(cfg.Guest.Kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := cfg.EnsureDirs(); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	st, err := store.Open(cfg.StateDir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ev := events.NewBroker()
	jm, _ := jobs.NewManager(st, ev, log)
	fake := xentest.New()
	vms := vm.NewManager(ctx, cfg, fake, st, ev, jm, log)
	reg := prometheus.NewRegistry()
	conns := connector.NewManager(nil, netip.Addr{}, vms, st, ev, log)
	if o.tls {
		tls := config.TLS{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "host.pem"), Key: filepath.Join(dir, "host.key")}
		cfg.Checkpoint.TLS, cfg.Swap.TLS = tls, tls
	}
	deps := api.Deps{VMs: vms, Jobs: jm, Events: ev, Hypervisor: fake, Connectors: conns, Version: "test",
		Roles: cfg.Roles, Registry: reg, Gatherer: reg, Log: log}
	if o.full {
		// No VM here is created on served memory, so no memory server
		// is ever started (the executable is never run).
		deps.Protection = protect.NewManager(ctx, cfg, fake, vms, protect.NewMemories(cfg, "/nonexistent/hostd", log), st, ev, jm, log)
		vms.SetMemory(deps.Protection)
		deps.Swap = swap.NewManager(ctx, cfg, fake, vms, st, ev, log)
	}
	srv, err := api.New(deps, o.group)
	if err != nil {
		t.Fatal(err)
	}
	l, err := srv.Listen(cfg.API.Socket)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ctx, l)
	t.Cleanup(func() {
		cancel()
		srv.Shutdown(context.Background())
		if deps.Swap != nil {
			deps.Swap.Close()
		}
		jm.Wait(context.Background())
		vms.Wait()
		st.Close()
	})
	return &env{c: client.New(cfg.API.Socket), fake: fake, srv: srv, sock: cfg.API.Socket, cfg: cfg}
}

func TestBadInputsGetClearJSONErrors(t *testing.T) {
	e := start(t)
	ctx := context.Background()
	if _, err := e.c.CreateVM(ctx, vm.Request{Name: "taken"}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, method, path, body string
		status                   int
		mention                  string
	}{
		{"malformed JSON", "POST", "/v1/vms", `{"name": "a",`, 400, "malformed JSON"},
		{"unknown field", "POST", "/v1/vms", `{"name":"a","memroy_mib":64}`, 400, "unknown field"},
		{"wrong type", "POST", "/v1/vms", `{"name":"a","memory_mib":"lots"}`, 400, "memory_mib"},
		{"trailing data", "POST", "/v1/vms", `{"name":"a"} {}`, 400, "trailing data"},
		{"missing name", "POST", "/v1/vms", `{}`, 400, "name is required"},
		{"bad name", "POST", "/v1/vms", `{"name":"Bad_Name"}`, 400, "must be 1-63"},
		{"zero memory", "POST", "/v1/vms", `{"name":"a","memory_mib":1}`, 400, "below the minimum"},
		{"absurd memory", "POST", "/v1/vms", `{"name":"a","memory_mib":99999999}`, 400, "exceeds the host"},
		{"absurd vcpus", "POST", "/v1/vms", `{"name":"a","vcpus":4096}`, 400, "exceeds the host"},
		{"missing kernel", "POST", "/v1/vms", `{"name":"a","kernel":"/nonexistent/vmlinuz"}`, 400, "does not exist"},
		{"duplicate", "POST", "/v1/vms", `{"name":"taken"}`, 409, "already exists"},
		{"unknown VM", "GET", "/v1/vms/ghost", ``, 404, "no such VM"},
		{"unknown VM action", "POST", "/v1/vms/ghost/start", ``, 404, "no such VM"},
		{"unknown job", "GET", "/v1/jobs/job-0", ``, 404, "job not found"},
		{"bad shutdown timeout", "POST", "/v1/vms/taken/shutdown", `{"timeout_s":-1}`, 400, "timeout_s"},
		{"bad console lines", "GET", "/v1/vms/taken/console?lines=x", ``, 400, "lines"},
		{"no route", "GET", "/v2/nothing", ``, 404, "no route"},
		{"wrong method", "PUT", "/v1/vms", `{}`, 405, "not allowed"},
		{"start running VM", "POST", "/v1/vms/taken/start", ``, 409, "state"},
		{"connectors without dataplane", "GET", "/v1/connectors", ``, 501, "dataplane.underlay"},
		{"bad connector id", "GET", "/v1/connectors/zero", ``, 400, "must be a number"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var body any
			if c.body != "" {
				body = strings.NewReader(c.body)
			}
			err := e.c.Do(ctx, c.method, c.path, body, nil)
			ce, ok := err.(*client.Error)
			if !ok {
				t.Fatalf("want HTTP %d, got %v", c.status, err)
			}
			if ce.Status != c.status || !strings.Contains(ce.Message, c.mention) {
				t.Fatalf("got %d %q, want %d mentioning %q", ce.Status, ce.Message, c.status, c.mention)
			}
		})
	}
	// None of the rejected creates left anything in the hypervisor.
	vms, err := e.c.ListVMs(ctx)
	if err != nil || len(vms) != 1 || vms[0].Name != "taken" {
		t.Fatalf("after bad requests: %+v %v", vms, err)
	}
	if n := e.fake.Calls["define"]; n != 1 {
		t.Fatalf("bad requests reached the hypervisor: %d defines", n)
	}
}

func TestHypervisorDownIs503AndRecovers(t *testing.T) {
	e := start(t)
	ctx := context.Background()
	e.fake.SetDown(true)
	_, err := e.c.Host(ctx)
	if !client.IsStatus(err, http.StatusServiceUnavailable) {
		t.Fatalf("hypervisor down: %v, want 503", err)
	}
	if _, err := e.c.CreateVM(ctx, vm.Request{Name: "a"}); !client.IsStatus(err, http.StatusServiceUnavailable) {
		t.Fatalf("create while down: %v, want 503", err)
	}
	e.fake.SetDown(false)
	if _, err := e.c.CreateVM(ctx, vm.Request{Name: "a"}); err != nil {
		t.Fatalf("create after recovery: %v", err)
	}
}

func TestLifecycleJobsAndEvents(t *testing.T) {
	e := start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	evs, err := e.c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v, err := e.c.CreateVM(ctx, vm.Request{Name: "a", MemoryMiB: 64})
	if err != nil || v.State != "running" || v.Spec.RAMPath == "" || v.Started == nil {
		t.Fatalf("create: %+v %v", v, err)
	}
	j, err := e.c.ShutdownVM(ctx, "a", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	j, err = e.c.WaitJob(ctx, j.ID)
	if err != nil || j.State != jobs.Succeeded || j.Report == nil {
		t.Fatalf("shutdown job: %+v %v", j, err)
	}
	if v, _ := e.c.VM(ctx, "a"); v.State != "shutoff" {
		t.Fatalf("after shutdown: %s", v.State)
	}
	if err := e.c.DeleteVM(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(v.Spec.RAMPath)); !os.IsNotExist(err) {
		t.Fatalf("VM directory left after delete: %v", err)
	}
	want := []string{"vm.created", "job.started", "job.finished", "vm.deleted"}
	var got []string
	for len(got) < len(want) {
		select {
		case ev := <-evs:
			if slices.Contains(want, ev.Type) {
				got = append(got, ev.Type)
			}
		case <-ctx.Done():
			t.Fatalf("events: got %v, want %v", got, want)
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("events: got %v, want %v", got, want)
	}
	m, err := e.c.Metrics(ctx)
	if err != nil || !strings.Contains(m, `hostd_api_requests_total{code="201",route="/v1/vms"} 1`) {
		t.Fatalf("metrics: %v\n%s", err, m)
	}
}

// The OpenAPI document and the server's routes must name the same
// operations: a route added without documentation fails here, and so does
// documentation of a route that does not exist.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	e := start(t)
	var doc struct {
		Paths map[string]map[string]any `yaml:"paths"`
	}
	if err := yaml.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	var documented []string
	for path, ops := range doc.Paths {
		for method := range ops {
			if method == "parameters" {
				continue
			}
			documented = append(documented, strings.ToUpper(method)+" "+path)
		}
	}
	served := slices.Clone(e.srv.Routes)
	slices.Sort(documented)
	slices.Sort(served)
	if !slices.Equal(documented, served) {
		t.Fatalf("openapi.yaml documents\n  %v\nthe server routes\n  %v", documented, served)
	}
}

func TestSocketIsGroupOnly(t *testing.T) {
	e := start(t)
	st, err := os.Stat(e.sock)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o660 {
		t.Fatalf("socket mode %o, want 660", perm)
	}
}
