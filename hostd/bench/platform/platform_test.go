package platform

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"hostd/hostd/hostdtest"
	"hostd/hostd/vm"
	"hostd/images/guest/agentclient"
)

const prefix = "bench-"

// rounds of each boot measurement; alternated so drift hits both sides.
const rounds = 3

// BenchmarkPlatform prints:
//
//	create_to_ready_vs_virsh: POST /v1/vms until the guest agent's ready line,
//	  over the same domain XML given to `virsh create` until the same line
//	api_get_vm_us:            GET /v1/vms/{name}, per request
//	api_list_100_vms_us:      GET /v1/vms with 100 VMs defined, per request
func BenchmarkPlatform(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root and libvirt")
	}
	bin, err := hostdtest.Build(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	hostdtest.CleanupDomains(b, prefix) // left by a killed run
	b.Cleanup(func() { hostdtest.CleanupDomains(b, prefix) })
	d := hostdtest.Start(b, bin, hostdtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	for i := 0; i < b.N; i++ {
		var viaHostd, viaVirsh []float64
		for r := 0; r < rounds; r++ {
			name := fmt.Sprintf("%sboot%d", prefix, r)
			ms, xml := bootViaHostd(ctx, b, d, name)
			viaHostd = append(viaHostd, ms)
			viaVirsh = append(viaVirsh, bootViaVirsh(ctx, b, xml, name, fmt.Sprintf("%svirsh%d", prefix, r)))
		}
		h, v := median(viaHostd), median(viaVirsh)
		fmt.Printf("bench: create_to_ready_ms_hostd %.0f ms\n", h)
		fmt.Printf("bench: create_to_ready_ms_virsh %.0f ms\n", v)
		fmt.Printf("bench: create_to_ready_vs_virsh %.3f ratio\n", h/v)

		fmt.Printf("bench: api_get_vm_us %.0f us\n", apiGetVM(ctx, b, d))
		fmt.Printf("bench: api_list_100_vms_us %.0f us\n", apiList100(ctx, b, d))
	}
}

// bootViaHostd creates a VM through the socket and times the request until
// the vm.ready event; it returns that time and the domain XML hostd made.
func bootViaHostd(ctx context.Context, b *testing.B, d *hostdtest.Daemon, name string) (float64, string) {
	b.Helper()
	ectx, stop := context.WithCancel(ctx)
	defer stop()
	evs, err := d.Client.Events(ectx)
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	if _, err := d.Client.CreateVM(ctx, vm.Request{Name: name, MemoryMiB: 256}); err != nil {
		b.Fatal(err)
	}
	for e := range evs {
		if e.Type == "vm.ready" && e.VM == name {
			break
		}
	}
	ms := float64(time.Since(t0).Microseconds()) / 1000
	if ctx.Err() != nil {
		b.Fatalf("%s never became ready", name)
	}
	xml, err := hostdtest.Virsh("dumpxml", "--inactive", name)
	if err != nil {
		b.Fatalf("dumpxml: %v", err)
	}
	if err := d.Client.DeleteVM(ctx, name); err != nil {
		b.Fatal(err)
	}
	return ms, xml
}

var uuidRE = regexp.MustCompile(`(?s)<uuid>.*?</uuid>`)

// bootViaVirsh boots the same XML under another name (and so other paths)
// with `virsh create`, and times it until the ready line is in the serial log.
func bootViaVirsh(ctx context.Context, b *testing.B, xml, oldName, name string) float64 {
	b.Helper()
	xml = uuidRE.ReplaceAllString(strings.ReplaceAll(xml, oldName, name), "")
	serial := regexp.MustCompile(`<source path='([^']*serial\.log)'`).FindStringSubmatch(xml)
	if serial == nil {
		b.Fatalf("no serial log in the domain XML")
	}
	for _, m := range regexp.MustCompile(`'(/[^']*/)`+regexp.QuoteMeta(name)+`[/.]`).FindAllStringSubmatch(xml, -1) {
		if err := os.MkdirAll(filepath.Join(m[1], name), 0o750); err != nil {
			b.Fatal(err)
		}
	}
	f := filepath.Join(b.TempDir(), name+".xml")
	if err := os.WriteFile(f, []byte(xml), 0o600); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	if out, err := hostdtest.Virsh("create", f); err != nil {
		b.Fatalf("virsh create: %v\n%s", err, out)
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := agentclient.WaitReady(wctx, serial[1]); err != nil {
		b.Fatalf("virsh-created guest: %v", err)
	}
	ms := float64(time.Since(t0).Microseconds()) / 1000
	_, _ = hostdtest.Virsh("destroy", name)
	os.RemoveAll(filepath.Dir(serial[1]))
	return ms
}

func apiGetVM(ctx context.Context, b *testing.B, d *hostdtest.Daemon) float64 {
	b.Helper()
	name := prefix + "get"
	if _, err := d.Client.CreateVM(ctx, vm.Request{Name: name, MemoryMiB: 64, Start: ptr(false)}); err != nil {
		b.Fatal(err)
	}
	defer d.Client.DeleteVM(ctx, name)
	return perRequestUS(b, 500, func() error { _, err := d.Client.VM(ctx, name); return err })
}

func apiList100(ctx context.Context, b *testing.B, d *hostdtest.Daemon) float64 {
	b.Helper()
	var names []string
	for i := 0; i < 100; i++ {
		n := fmt.Sprintf("%slist%03d", prefix, i)
		if _, err := d.Client.CreateVM(ctx, vm.Request{Name: n, MemoryMiB: 64, Start: ptr(false)}); err != nil {
			b.Fatal(err)
		}
		names = append(names, n)
	}
	defer func() {
		for _, n := range names {
			_ = d.Client.DeleteVM(ctx, n)
		}
	}()
	return perRequestUS(b, 50, func() error {
		vms, err := d.Client.ListVMs(ctx)
		if err == nil && len(vms) < 100 {
			err = fmt.Errorf("list returned %d VMs, want 100", len(vms))
		}
		return err
	})
}

// perRequestUS returns the median of n timed calls, in microseconds, after
// a few warm-up calls.
func perRequestUS(b *testing.B, n int, call func() error) float64 {
	b.Helper()
	for i := 0; i < 5; i++ {
		if err := call(); err != nil {
			b.Fatal(err)
		}
	}
	samples := make([]float64, n)
	for i := range samples {
		t0 := time.Now()
		if err := call(); err != nil {
			b.Fatal(err)
		}
		samples[i] = float64(time.Since(t0).Nanoseconds()) / 1000
	}
	return median(samples)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func ptr[T any](v T) *T { return &v }
