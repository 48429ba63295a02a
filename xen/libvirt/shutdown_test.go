package libvirt

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hostd/xen"
)

// guestHandlesACPI tells from build/guest/guest.json whether the test guest
// loads the ACPI power button driver, without which no guest can see the
// button Shutdown presses.
func guestHandlesACPI(t *testing.T, g guestFiles) bool {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(g.Kernel), "guest.json"))
	if err != nil {
		t.Logf("no guest.json (%v): assuming the guest ignores ACPI", err)
		return false
	}
	var manifest struct {
		Modules []string `json:"modules"`
	}
	if err := json.Unmarshal(b, &manifest); err != nil {
		t.Fatalf("guest.json: %v", err)
	}
	for _, m := range manifest.Modules {
		if strings.HasSuffix(m, "/button.ko") {
			return true
		}
	}
	return false
}

// TestShutdown presses the ACPI power button. A guest that handles it must
// be off when Shutdown returns; one that does not must be left running with
// ErrState after the timeout. Either way a cancelled context ends the wait.
func TestShutdown(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	name := uniqueName(t)
	spec := guestSpec(t, g, name, shortTempDir(t))
	cleanupDomain(t, d, name)
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	if err := d.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitSerial(t, spec.SerialLog, "HOSTD-AGENT READY", 1, bootTimeout)

	acpi := guestHandlesACPI(t, g)
	if !acpi {
		// A cancelled context ends the wait with the context's error.
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		err := d.Shutdown(cctx, name, time.Hour)
		ccancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown with a short context: want DeadlineExceeded, got %v", err)
		}
	}

	t0 := time.Now()
	err := d.Shutdown(ctx, name, 10*time.Second)
	t.Logf("Shutdown returned after %s: %v (guest loads the ACPI button driver: %v)", time.Since(t0).Round(time.Millisecond), err, acpi)
	info, ierr := d.Domain(ctx, name)
	if ierr != nil {
		t.Fatal(ierr)
	}
	if acpi {
		if err != nil || info.State != xen.StateShutoff {
			t.Fatalf("guest with ACPI support: Shutdown %v, state %s", err, info.State)
		}
		return
	}
	if !errors.Is(err, xen.ErrState) || !strings.Contains(err.Error(), "destroy it instead") {
		t.Fatalf("guest without ACPI support: want ErrState telling what to do, got %v", err)
	}
	if info.State != xen.StateRunning {
		t.Fatalf("after a timed-out Shutdown the domain must still run, it is %s", info.State)
	}
	agentPing(t, spec.AgentSocket)
}
