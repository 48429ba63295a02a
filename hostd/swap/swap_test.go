package swap

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/checkpoint/pki"
	"hostd/dataplane/nbd"
	"hostd/dataplane/overload"
	"hostd/hostd/config"
	"hostd/hostd/events"
	"hostd/hostd/store"
	"hostd/hostd/valid"
	"hostd/hostd/vm"
	"hostd/xen"
	"hostd/xen/xentest"
)

// fakeVMs answers Get with fixed VMs.
type fakeVMs map[string]xen.State

func (f fakeVMs) DomainOf(name string) string { return name }

func (f fakeVMs) Get(_ context.Context, name string) (vm.VM, error) {
	st, ok := f[name]
	if !ok {
		return vm.VM{}, vm.ErrNotFound
	}
	return vm.VM{Record: vm.Record{Name: name}, State: st}, nil
}

type env struct {
	cfg config.Config
	hv  *xentest.Fake
	vms fakeVMs
	st  *store.Store
	ev  *events.Broker
}

// newEnv is a host with a test PKI for [swap] tls, a fake hypervisor with
// a running domain "web", and a store. The repository it names does not
// exist: devices work on their local file until one answers.
func newEnv(t *testing.T) *env {
	dir, err := os.MkdirTemp("", "hsw") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := pki.Generate(filepath.Join(dir, "pki"), pki.Spec{ServerNames: []string{"127.0.0.1"}, Hosts: []string{"host1"}}); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.StateDir, cfg.RunDir = filepath.Join(dir, "state"), filepath.Join(dir, "run")
	p := filepath.Join(dir, "pki")
	cfg.Swap.TLS = config.TLS{CA: filepath.Join(p, pki.CACert), Cert: filepath.Join(p, pki.ClientCert("host1")), Key: filepath.Join(p, pki.ClientKey("host1"))}
	cfg.Swap.SampleInterval = config.Duration{Duration: 100 * time.Millisecond}
	if err := cfg.EnsureDirs(); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(cfg.StateDir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	hv := xentest.New()
	ctx := context.Background()
	if err := hv.Define(ctx, xen.DomainSpec{Name: "web", VCPUs: 1, MemoryMiB: 64}); err != nil {
		t.Fatal(err)
	}
	if err := hv.Start(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	return &env{cfg: cfg, hv: hv, vms: fakeVMs{"web": xen.StateRunning, "off": xen.StateShutoff}, st: st, ev: events.NewBroker()}
}

func (e *env) manager(t *testing.T) *Manager {
	m := NewManager(context.Background(), e.cfg, e.hv, e.vms, e.st, e.ev, slog.Default())
	t.Cleanup(m.Close)
	return m
}

var good = Request{SizeMiB: 4, Repos: []string{"127.0.0.1:1"}}

func TestPutRefusesBadRequests(t *testing.T) {
	e := newEnv(t)
	m := e.manager(t)
	ctx := context.Background()
	for _, tc := range []struct {
		what string
		vm   string
		req  Request
		want error
	}{
		{"size 0", "web", Request{Repos: good.Repos}, ErrInvalid},
		{"too large", "web", Request{SizeMiB: e.cfg.Swap.MaxSizeMiB + 1, Repos: good.Repos}, ErrInvalid},
		{"no repos", "web", Request{SizeMiB: 4}, ErrInvalid},
		{"bad address", "web", Request{SizeMiB: 4, Repos: []string{"10.0.0.1"}}, valid.ErrAddress},
		{"port out of range", "web", Request{SizeMiB: 4, Repos: []string{"a:99999"}}, valid.ErrAddress},
		{"name out of the state directory", "../../x", good, valid.ErrName},
		{"repo twice", "web", Request{SizeMiB: 4, Repos: []string{"a:1", "a:1"}}, ErrInvalid},
		{"unknown VM", "ghost", good, vm.ErrNotFound},
		{"stopped VM", "off", good, ErrState},
	} {
		if _, err := m.Put(ctx, tc.vm, tc.req); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.what, err, tc.want)
		}
	}
	// A local disk that cannot hold the write-through copy: refused up front.
	e.cfg.Swap.MaxSizeMiB = 1 << 40
	if _, err := e.manager(t).Put(ctx, "web", Request{SizeMiB: 1 << 40, Repos: good.Repos}); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "free") {
		t.Errorf("disk too small: %v, want ErrInvalid saying what is free", err)
	}
	e.cfg.Swap.TLS = config.TLS{}
	if _, err := e.manager(t).Put(ctx, "web", good); !errors.Is(err, ErrNotConfigured) {
		t.Errorf("no swap tls: %v, want ErrNotConfigured", err)
	}
	// A protected VM: its swapped-out pages would not move with it.
	if err := store.Put(e.st, store.BucketProtection, "web", map[string]string{"backup": "b:1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Put(ctx, "web", good); !errors.Is(err, ErrProtected) {
		t.Errorf("protected VM: %v, want ErrProtected", err)
	}
	if err := e.st.Delete(store.BucketProtection, "web"); err != nil {
		t.Fatal(err)
	}
	if l := m.List(); len(l) != 0 {
		t.Errorf("devices after refused requests: %+v", l)
	}
	if _, err := os.Stat(filepath.Join(vmDir(t, e.cfg, "web"), "swap.img")); !os.IsNotExist(err) {
		t.Errorf("a refused request left a file: %v", err)
	}
}

// A device serves its socket, counts the operations, and the sampler turns
// a burst of them into overload_started.
func TestPutServesAndSamples(t *testing.T) {
	e := newEnv(t)
	m := e.manager(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	evs := e.ev.Subscribe(ctx, 64)
	st, err := m.Put(ctx, "web", good)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Put(ctx, "web", good); !errors.Is(err, ErrExists) {
		t.Fatalf("second put: %v, want ErrExists", err)
	}
	c, err := nbd.Dial(ctx, "unix", st.Socket, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	page := bytes.Repeat([]byte{0xa5}, 4096)
	// Far above 200 ops/s for the 100 ms intervals: 100 writes at once.
	for i := 0; i < 100; i++ {
		if err := c.WriteAt(ctx, page, int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, got, 99*4096); err != nil || !bytes.Equal(got, page) {
		t.Fatalf("read back: %v", err)
	}
	// Malformed input on the socket: a connection that sends garbage
	// instead of the handshake is dropped, a request past the end is
	// refused, and the device goes on serving.
	raw, err := net.Dial("unix", st.Socket)
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = raw.Write(bytes.Repeat([]byte("garbage!"), 64))
	if _, err := io.Copy(io.Discard, raw); err != nil {
		t.Errorf("the server kept a garbage connection open: %v", err)
	}
	raw.Close()
	if err := c.ReadAt(ctx, got, st.Stats.Size); err == nil {
		t.Error("a read past the end succeeded")
	}
	if err := c.ReadAt(ctx, got, 99*4096); err != nil || !bytes.Equal(got, page) {
		t.Fatalf("read after malformed requests: %v", err)
	}
	for seen := false; !seen; {
		select {
		case ev := <-evs:
			seen = ev.Type == string(overload.Started) && ev.VM == "web"
		case <-ctx.Done():
			t.Fatal("no overload_started event")
		}
	}
	s, err := m.Get("web")
	if err != nil {
		t.Fatal(err)
	}
	if s.Stats.WriteOps < 100 || s.Stats.PagesLocalOnly != 100 {
		t.Errorf("stats after 100 writes with no repository: %+v", s.Stats)
	}
	if err := m.Delete(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get("web"); !errors.Is(err, ErrNoSwap) {
		t.Errorf("get after delete: %v", err)
	}
	if _, err := os.Stat(st.Path); !os.IsNotExist(err) {
		t.Errorf("file left after delete: %v", err)
	}
}

// A restarted hostd serves the device again from its local file.
func TestResumeServesTheFileAgain(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := NewManager(ctx, e.cfg, e.hv, e.vms, e.st, e.ev, slog.Default())
	st, err := m.Put(ctx, "web", good)
	if err != nil {
		t.Fatal(err)
	}
	c, err := nbd.Dial(ctx, "unix", st.Socket, "")
	if err != nil {
		t.Fatal(err)
	}
	page := bytes.Repeat([]byte{0x3c}, 4096)
	if err := c.WriteAt(ctx, page, 8*4096, false); err != nil {
		t.Fatal(err)
	}
	c.Close()
	m.Close() // graceful stop: flushed, the record kept

	m2 := e.manager(t)
	m2.Resume(ctx)
	c, err = nbd.Dial(ctx, "unix", st.Socket, "")
	if err != nil {
		t.Fatalf("socket not served again: %v", err)
	}
	defer c.Close()
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, got, 8*4096); err != nil || !bytes.Equal(got, page) {
		t.Fatalf("page after resume: %v", err)
	}
	// A VM that stopped meanwhile loses its device.
	e.vms["web"] = xen.StateShutoff
	m3 := e.manager(t)
	m2.Close()
	m3.Resume(ctx)
	if l := m3.List(); len(l) != 0 {
		t.Errorf("device of a stopped VM resumed: %+v", l)
	}
	if _, err := os.Stat(st.Path); !os.IsNotExist(err) {
		t.Errorf("file of a stopped VM's device left: %v", err)
	}
}

// vmDir is a domain's directory, for names the test knows to be valid.
func vmDir(t *testing.T, cfg config.Config, domain string) string {
	t.Helper()
	dir, err := cfg.VMDir(domain)
	if err != nil {
		t.Fatal(err)
	}
	return dir
}
