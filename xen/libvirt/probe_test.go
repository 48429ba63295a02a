package libvirt

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"hostd/xen"
)

// TestAccelAutoWithoutProbeKernel: with nothing to boot, auto cannot prove
// KVM and must settle on TCG, on any machine.
func TestAccelAutoWithoutProbeKernel(t *testing.T) {
	requireLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := New(ctx, Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer d.Close()
	if d.Accel() != xen.AccelTCG {
		t.Fatalf("auto without probe kernel: accel %s, want tcg", d.Accel())
	}
	hi, err := d.Host(ctx)
	if err != nil {
		t.Fatalf("Host: %v", err)
	}
	t.Logf("host: %+v", hi)
	if hi.Accel != xen.AccelTCG || hi.URI != "qemu:///system" || hi.Driver != "QEMU" ||
		!strings.HasPrefix(hi.Hypervisor, "QEMU ") || !strings.HasPrefix(hi.Library, "libvirt ") ||
		hi.CPUs < 1 || hi.MemoryMiB < hi.FreeMemoryMiB || hi.FreeMemoryMiB == 0 || hi.CPUModel == "" {
		t.Fatalf("host info: %+v", hi)
	}
}

// TestAccelAutoProbe runs the real probe and checks its verdict against an
// independent attempt to boot the test guest under KVM: auto must say kvm
// exactly where a KVM guest reaches its agent. (On PVM hosts /dev/kvm
// exists, yet stock kernels never boot: auto must end up on tcg there.)
func TestAccelAutoProbe(t *testing.T) {
	g := testGuest(t)
	requireLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	t0 := time.Now()
	d, err := New(ctx, Config{Logger: testLogger(t), ProbeKernel: g.Kernel, ProbeInitrd: g.Initrd})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	t.Logf("measured: auto resolved to %s in %s", d.Accel(), time.Since(t0).Round(time.Millisecond))

	// The probe leaves nothing behind.
	list, err := d.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, di := range list {
		if strings.HasPrefix(di.Name, "hostd-kvm-probe-") {
			t.Errorf("probe domain left behind: %+v", di)
		}
	}

	if _, err := os.Stat("/dev/kvm"); err != nil {
		if d.Accel() != xen.AccelTCG {
			t.Fatalf("no /dev/kvm but accel %s", d.Accel())
		}
		return
	}

	// Independent check: a KVM domain of the test guest.
	kd, err := New(ctx, Config{Accel: xen.AccelKVM, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("New kvm: %v", err)
	}
	t.Cleanup(func() { kd.Close() }) // after cleanupDomain's, which uses it
	name := uniqueName(t)
	spec := guestSpec(t, g, name, shortTempDir(t))
	cleanupDomain(t, kd, name)
	if err := kd.Define(ctx, spec); err != nil {
		t.Fatalf("Define kvm: %v", err)
	}
	if err := kd.Start(ctx, name); err != nil {
		// Refusing to start at all is also "KVM does not work".
		t.Logf("kvm domain does not start: %v", err)
		if d.Accel() == xen.AccelKVM {
			t.Fatalf("probe said kvm, but a kvm domain does not start: %v", err)
		}
		return
	}
	// A working KVM boots the guest in seconds; TCG needs about 10 s here.
	booted := true
	deadline := time.Now().Add(45 * time.Second)
	for i := 0; ; i++ {
		b, err := os.ReadFile(spec.SerialLog)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "HOSTD-AGENT READY") {
			break
		}
		if time.Now().After(deadline) || i > 500 {
			booted = false
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if booted != (d.Accel() == xen.AccelKVM) {
		t.Fatalf("probe said %s, but the test guest under kvm booted=%v", d.Accel(), booted)
	}
}
