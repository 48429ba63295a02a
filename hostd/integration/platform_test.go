package integration

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"hostd/hostd/client"
	"hostd/hostd/hostdtest"
	"hostd/hostd/jobs"
	"hostd/hostd/vm"
	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
	"hostd/xen"
)

func startHostd(t *testing.T, o hostdtest.Options) *hostdtest.Daemon {
	t.Helper()
	t.Cleanup(func() { hostdtest.CleanupDomains(t, prefix) })
	return hostdtest.Start(t, binDir, o)
}

// The whole life of a VM through the socket: create, boot to the agent's
// ready line, console, stats, events, ACPI shutdown job, restart, delete.
func TestVMLifecycle(t *testing.T) {
	d := startHostd(t, hostdtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := d.Client
	evs, err := c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}

	v, err := c.CreateVM(ctx, vm.Request{Name: prefix + "life", MemoryMiB: 192})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if v.State != xen.StateRunning || v.UUID == "" {
		t.Fatalf("created VM: %+v", v)
	}
	v, err = c.WaitReady(ctx, v.Name)
	if err != nil {
		t.Fatalf("wait ready: %v", err)
	}
	if v.BootMS <= 0 || v.GuestUptimeMS == 0 {
		t.Fatalf("boot_ms not measured: %+v", v)
	}
	t.Logf("create-to-ready %.0f ms, of which %d ms inside the guest", v.BootMS, v.GuestUptimeMS)

	con, err := c.Console(ctx, v.Name, 20)
	if err != nil || !strings.Contains(string(con), agentapi.ReadyPrefix) {
		t.Fatalf("console tail lacks the ready line: %v\n%s", err, con)
	}
	// The agent answers on its channel: the VM is really up.
	ac, err := agentclient.Dial(ctx, v.Spec.AgentSocket)
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	if _, err := ac.Ping(ctx); err != nil {
		t.Fatalf("agent ping: %v", err)
	}
	ac.Close()

	st, err := c.Stats(ctx, v.Name)
	if err != nil || st.CPUTime <= 0 || st.MemoryMiB == 0 {
		t.Fatalf("stats: %+v %v", st, err)
	}
	// The RAM file hostd chose backs the guest (the checkpoint code serves it).
	if fi, err := os.Stat(v.Spec.RAMPath); err != nil || fi.Size() != 192<<20 {
		t.Fatalf("RAM file %s: %v size %d", v.Spec.RAMPath, err, fi.Size())
	}

	j, err := c.ShutdownVM(ctx, v.Name, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if j, err = c.WaitJob(ctx, j.ID); err != nil || j.State != jobs.Succeeded {
		t.Fatalf("shutdown job: %+v %v", j, err)
	}
	if v, _ = c.VM(ctx, v.Name); v.State != xen.StateShutoff {
		t.Fatalf("after shutdown: %s", v.State)
	}

	// A second boot is measured from its own start, not the first one's line.
	if _, err := c.StartVM(ctx, v.Name); err != nil {
		t.Fatal(err)
	}
	if v, err = c.WaitReady(ctx, v.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DestroyVM(ctx, v.Name); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVM(ctx, v.Name); err != nil {
		t.Fatal(err)
	}
	if names, _ := hostdtest.Domains(v.Name); len(names) != 0 {
		t.Fatalf("domain left in libvirt after delete: %v", names)
	}
	if _, err := os.Stat(filepath.Dir(v.Spec.RAMPath)); !os.IsNotExist(err) {
		t.Fatalf("VM files left after delete: %v", err)
	}

	seen := map[string]bool{}
	want := []string{"vm.created", "vm.ready", "vm.lifecycle", "job.finished", "vm.deleted"}
	deadline := time.After(10 * time.Second)
collect:
	for {
		select {
		case e := <-evs:
			seen[e.Type] = true
			if e.Type == "vm.deleted" {
				break collect
			}
		case <-deadline:
			break collect
		}
	}
	for _, w := range want {
		if !seen[w] {
			t.Errorf("event %s not seen (saw %v)", w, seen)
		}
	}
}

// Bad inputs through the real driver: each a 4xx with a JSON error, none
// leaving a half-made domain in libvirt.
func TestBadInputsLeaveNothingBehind(t *testing.T) {
	d := startHostd(t, hostdtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := d.Client
	if _, err := c.CreateVM(ctx, vm.Request{Name: prefix + "dup", MemoryMiB: 64, Start: ptr(false)}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		req    vm.Request
		status int
		words  string
	}{
		{"missing kernel", vm.Request{Name: prefix + "k", Kernel: "/nonexistent/vmlinuz"}, 400, "does not exist"},
		{"zero memory", vm.Request{Name: prefix + "m0", MemoryMiB: 1}, 400, "below the minimum"},
		{"absurd memory", vm.Request{Name: prefix + "mx", MemoryMiB: 1 << 40}, 400, "exceeds the host"},
		{"duplicate", vm.Request{Name: prefix + "dup"}, 409, "already exists"},
		{"bad tap name", vm.Request{Name: prefix + "tap", NICs: []xen.NIC{{Tap: "a-tap-name-much-too-long"}}}, 400, "tap"},
		{"bad MAC", vm.Request{Name: prefix + "mac", NICs: []xen.NIC{{Tap: "ittap0", MAC: "zz:zz"}}}, 400, "MAC"},
		{"missing disk", vm.Request{Name: prefix + "disk", Disks: []xen.Disk{{Path: "/nonexistent.img"}}}, 400, "disk"},
	}
	for _, tc := range cases {
		_, err := c.CreateVM(ctx, tc.req)
		var ce *client.Error
		if !asClientErr(err, &ce) || ce.Status != tc.status || !strings.Contains(strings.ToLower(ce.Message), strings.ToLower(tc.words)) {
			t.Errorf("%s: got %v, want HTTP %d mentioning %q", tc.name, err, tc.status, tc.words)
		}
	}
	names, err := hostdtest.Domains(prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 1 || names[0] != prefix+"dup" {
		t.Fatalf("libvirt domains after bad requests: %v (want only %sdup)", names, prefix)
	}
	for _, p := range []string{"/v1/vms/" + prefix + "ghost", "/v1/vms/" + prefix + "ghost/stats"} {
		if err := c.Do(ctx, http.MethodGet, p, nil, nil); !client.IsStatus(err, 404) {
			t.Errorf("GET %s: %v, want 404", p, err)
		}
	}
}

// kill -9 of hostd while guests run: the guests keep running, and the next
// daemon adopts them with their identity, and keeps managing them.
func TestKill9AdoptsRunningVMs(t *testing.T) {
	d := startHostd(t, hostdtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	names := []string{prefix + "adopt-a", prefix + "adopt-b"}
	uuids := map[string]string{}
	for _, n := range names {
		v, err := d.Client.CreateVM(ctx, vm.Request{Name: n, MemoryMiB: 128})
		if err != nil {
			t.Fatal(err)
		}
		uuids[n] = v.UUID
	}
	// One VM is ready before the crash; the other may still be booting,
	// which is the worst moment for readiness tracking.
	if _, err := d.Client.WaitReady(ctx, names[0]); err != nil {
		t.Fatal(err)
	}
	d.Kill9()

	for _, n := range names {
		out, err := hostdtest.Virsh("domstate", n)
		if err != nil || strings.TrimSpace(out) != "running" {
			t.Fatalf("%s after kill -9 of hostd: %q %v", n, out, err)
		}
	}

	d.Restart()
	for _, n := range names {
		v, err := d.Client.WaitReady(ctx, n)
		if err != nil {
			t.Fatalf("%s after restart: %v", n, err)
		}
		if v.State != xen.StateRunning || v.UUID != uuids[n] || v.Vanished {
			t.Fatalf("%s after restart: %+v", n, v)
		}
	}
	// Still managed: the adopted VM can be destroyed and deleted.
	if err := d.Client.DeleteVM(ctx, names[1]); err != nil {
		t.Fatal(err)
	}
	ac, err := agentclient.Dial(ctx, mustVM(t, d, names[0]).Spec.AgentSocket)
	if err != nil {
		t.Fatalf("agent of adopted VM: %v", err)
	}
	defer ac.Close()
	if _, err := ac.Ping(ctx); err != nil {
		t.Fatalf("agent of adopted VM: %v", err)
	}
}

// A domain removed behind hostd's back is marked vanished, not forgotten.
func TestVanishedDomainIsMarked(t *testing.T) {
	d := startHostd(t, hostdtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := prefix + "vanish"
	if _, err := d.Client.CreateVM(ctx, vm.Request{Name: n, MemoryMiB: 64, Start: ptr(false)}); err != nil {
		t.Fatal(err)
	}
	if out, err := hostdtest.Virsh("undefine", n); err != nil {
		t.Fatalf("virsh undefine: %v %s", err, out)
	}
	for i := 0; i < 100; i++ { // the reconcile interval is 2 s
		v, err := d.Client.VM(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		if v.Vanished {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("VM whose domain was undefined is not marked vanished")
}

// libvirtd down: the API answers 503 with a clear error, and hostd
// recovers by itself when libvirtd returns; guests survive.
func TestLibvirtdDownAndBack(t *testing.T) {
	d := startHostd(t, hostdtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	n := prefix + "survivor"
	if _, err := d.Client.CreateVM(ctx, vm.Request{Name: n, MemoryMiB: 128}); err != nil {
		t.Fatal(err)
	}
	stopLibvirtd(t)
	t.Cleanup(func() { startLibvirtd(t) }) // whatever happens below

	_, err := d.Client.Host(ctx)
	if !client.IsStatus(err, http.StatusServiceUnavailable) {
		t.Fatalf("GET /v1/host with libvirtd down: %v, want 503", err)
	}
	_, err = d.Client.CreateVM(ctx, vm.Request{Name: prefix + "while-down", MemoryMiB: 64})
	if !client.IsStatus(err, http.StatusServiceUnavailable) {
		t.Fatalf("create with libvirtd down: %v, want 503", err)
	}

	startLibvirtd(t)
	var v vm.VM
	for i := 0; i < 300; i++ { // bounded: 30 s
		if v, err = d.Client.VM(ctx, n); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil || v.State != xen.StateRunning {
		t.Fatalf("after libvirtd returned: %+v %v", v, err)
	}
	if _, err := d.Client.CreateVM(ctx, vm.Request{Name: prefix + "after", MemoryMiB: 64, Start: ptr(false)}); err != nil {
		t.Fatalf("create after libvirtd returned: %v", err)
	}
}

// Only root and the hostd group may use the socket: a process of another
// user is refused by the file mode, and, if the mode were opened, by the
// peer-credential check.
func TestSocketRefusesOtherUsers(t *testing.T) {
	d := startHostd(t, hostdtest.Options{})
	hostctl := filepath.Join(binDir, "hostctl")
	if err := os.Chmod(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The scratch dir must be traversable for the socket to be reachable.
	for p := d.Config.RunDir; p != "/" && p != os.TempDir(); p = filepath.Dir(p) {
		os.Chmod(p, 0o755)
	}
	asNobody := func() (string, error) {
		cmd := exec.Command(hostctl, "-socket", d.Config.API.Socket, "host")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := asNobody()
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("nobody through a 0660 socket: %v %s", err, out)
	}
	if err := os.Chmod(d.Config.API.Socket, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err = asNobody()
	if err == nil || !strings.Contains(out, "403") {
		t.Fatalf("nobody through an opened socket: %v %s (want 403 from the credential check)", err, out)
	}
}

// auto must settle on TCG on these machines, whose KVM cannot boot Linux.
func TestAutoAccelResolves(t *testing.T) {
	d := startHostd(t, hostdtest.Options{Accel: "auto"})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h, err := d.Client.Host(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h.Accel != xen.AccelTCG && h.Accel != xen.AccelKVM {
		t.Fatalf("accel %q not resolved", h.Accel)
	}
	kvmBoots := os.Getenv("HOSTD_EXPECT_KVM") == "1"
	if !kvmBoots && h.Accel != xen.AccelTCG {
		t.Fatalf("auto chose %s; this machine's KVM cannot boot stock kernels (set HOSTD_EXPECT_KVM=1 where it can)", h.Accel)
	}
	t.Logf("host: %+v", h)
}

func stopLibvirtd(t *testing.T) {
	t.Helper()
	if out, err := exec.Command("pkill", "-x", "libvirtd").CombinedOutput(); err != nil {
		t.Fatalf("stop libvirtd: %v %s", err, out)
	}
	for i := 0; i < 100; i++ {
		if exec.Command("pgrep", "-x", "libvirtd").Run() != nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("libvirtd did not stop within 10 s")
}

func startLibvirtd(t *testing.T) {
	t.Helper()
	if exec.Command("pgrep", "-x", "libvirtd").Run() == nil {
		return
	}
	if out, err := exec.Command("libvirtd", "-d").CombinedOutput(); err != nil {
		t.Fatalf("start libvirtd: %v %s", err, out)
	}
	for i := 0; i < 300; i++ {
		if _, err := hostdtest.Virsh("version"); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("libvirtd did not answer within 30 s")
}

func mustVM(t *testing.T, d *hostdtest.Daemon, name string) vm.VM {
	t.Helper()
	v, err := d.Client.VM(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func asClientErr(err error, ce **client.Error) bool {
	e, ok := err.(*client.Error)
	*ce = e
	return ok
}

func ptr[T any](v T) *T { return &v }
