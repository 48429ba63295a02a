package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"hostd/xen"
)

// fakeMonitor scripts QEMU's answers, to test the sequencing and polling
// logic here; the real thing is exercised end to end in xen/libvirt's
// TestSaveRestore.
type fakeMonitor struct {
	mu    sync.Mutex
	calls []string // "execute args" in order
	files int      // descriptors passed
	// reply returns the "return" for a command, or an error.
	reply func(n int, execute string, args any) (any, error)
}

func (f *fakeMonitor) Command(ctx context.Context, domain, execute string, args any) (json.RawMessage, error) {
	return f.CommandWithFiles(ctx, domain, execute, args, nil)
}

func (f *fakeMonitor) CommandWithFiles(ctx context.Context, domain, execute string, args any, files []*os.File) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	a, _ := json.Marshal(args)
	f.calls = append(f.calls, execute+" "+string(a))
	f.files += len(files)
	n := len(f.calls)
	f.mu.Unlock()
	ret, err := f.reply(n, execute, args)
	if err != nil {
		return nil, err
	}
	return json.Marshal(ret)
}

func (f *fakeMonitor) count(execute string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if strings.HasPrefix(c, execute+" ") {
			n++
		}
	}
	return n
}

func tempFile(t *testing.T) *os.File {
	f, err := os.CreateTemp(t.TempDir(), "state")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestSetMigrationCapabilities(t *testing.T) {
	f := &fakeMonitor{reply: func(int, string, any) (any, error) { return struct{}{}, nil }}
	c := New(f)
	if err := c.SetMigrationCapabilities(context.Background(), "vm", map[string]bool{"x-ignore-shared": true, "events": false}); err != nil {
		t.Fatal(err)
	}
	want := `migrate-set-capabilities {"capabilities":[{"capability":"events","state":false},{"capability":"x-ignore-shared","state":true}]}`
	if f.calls[0] != want {
		t.Fatalf("sent %s\nwant %s", f.calls[0], want)
	}
	if err := c.SetMigrationCapabilities(context.Background(), "vm", nil); err == nil {
		t.Fatal("no capabilities: want an error")
	}
	qmpErr := &xen.MonitorError{Command: "migrate-set-capabilities", Class: "GenericError", Desc: "bad capability"}
	f.reply = func(int, string, any) (any, error) { return nil, fmt.Errorf("wrapped: %w", qmpErr) }
	err := c.SetMigrationCapabilities(context.Background(), "vm", map[string]bool{"nope": true})
	var me *xen.MonitorError
	if !errors.As(err, &me) || me.Desc != "bad capability" || !strings.Contains(err.Error(), `"vm"`) {
		t.Fatalf("QMP error: %v", err)
	}
}

func TestSaveDeviceStatePollsUntilCompleted(t *testing.T) {
	polls := 0
	f := &fakeMonitor{reply: func(_ int, execute string, args any) (any, error) {
		switch execute {
		case "query-migrate":
			polls++
			if polls < 4 {
				return map[string]any{"status": "active"}, nil
			}
			return map[string]any{"status": "completed", "total-time": 7, "ram": map[string]any{"transferred": 1000, "total": 2000}}, nil
		}
		return struct{}{}, nil
	}}
	mi, err := New(f).SaveDeviceState(context.Background(), "vm", tempFile(t))
	if err != nil {
		t.Fatal(err)
	}
	if mi.Status != "completed" || mi.TotalTimeMS != 7 || mi.RAM == nil || mi.RAM.Transferred != 1000 || polls != 4 {
		t.Fatalf("result %+v after %d polls", mi, polls)
	}
	if f.calls[0] != `getfd {"fdname":"hostd-save"}` || f.files != 1 || f.calls[1] != `migrate {"uri":"fd:hostd-save"}` {
		t.Fatalf("calls %q, %d files", f.calls, f.files)
	}
}

func TestSaveDeviceStateFailed(t *testing.T) {
	f := &fakeMonitor{reply: func(_ int, execute string, _ any) (any, error) {
		if execute == "query-migrate" {
			return map[string]any{"status": "failed", "error-desc": "Unable to write to file"}, nil
		}
		return struct{}{}, nil
	}}
	_, err := New(f).SaveDeviceState(context.Background(), "vm", tempFile(t))
	if err == nil || !strings.Contains(err.Error(), "Unable to write to file") || !strings.Contains(err.Error(), `save device state of "vm"`) {
		t.Fatalf("want the failure with QEMU's reason, got %v", err)
	}
	if f.count("migrate_cancel") != 0 {
		t.Fatal("a failed migration needs no cancel")
	}
}

func TestSaveDeviceStateMigrateRefusedClosesFD(t *testing.T) {
	f := &fakeMonitor{reply: func(_ int, execute string, _ any) (any, error) {
		if execute == "migrate" {
			return nil, &xen.MonitorError{Command: "migrate", Class: "GenericError", Desc: "There's a migration process in progress"}
		}
		return struct{}{}, nil
	}}
	_, err := New(f).SaveDeviceState(context.Background(), "vm", tempFile(t))
	var me *xen.MonitorError
	if !errors.As(err, &me) {
		t.Fatalf("want the MonitorError, got %v", err)
	}
	if f.count("closefd") != 1 {
		t.Fatalf("the passed descriptor was not closed: %q", f.calls)
	}
}

func TestSaveDeviceStateCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeMonitor{}
	f.reply = func(n int, execute string, _ any) (any, error) {
		if execute == "query-migrate" {
			if n >= 5 {
				cancel()
			}
			return map[string]any{"status": "active"}, nil
		}
		return struct{}{}, nil
	}
	done := make(chan error, 1)
	go func() {
		_, err := New(f).SaveDeviceState(ctx, "vm", tempFile(t))
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("want context.Canceled, got %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("SaveDeviceState ignored its context")
	}
	if f.count("migrate_cancel") != 1 {
		t.Fatalf("migration not cancelled: %q", f.calls)
	}
}

func TestLoadDeviceState(t *testing.T) {
	statusPolls := 0
	f := &fakeMonitor{reply: func(_ int, execute string, _ any) (any, error) {
		switch execute {
		case "query-status":
			statusPolls++
			// inmigrate before the load and once after completion,
			// as QEMU does for a moment.
			if statusPolls <= 2 {
				return map[string]any{"running": false, "status": "inmigrate"}, nil
			}
			return map[string]any{"running": false, "status": "paused"}, nil
		case "query-migrate":
			return map[string]any{"status": "completed"}, nil
		}
		return struct{}{}, nil
	}}
	if err := New(f).LoadDeviceState(context.Background(), "vm", tempFile(t)); err != nil {
		t.Fatal(err)
	}
	want := []string{`query-status null`, `getfd {"fdname":"hostd-load"}`, `migrate-incoming {"uri":"fd:hostd-load"}`,
		`query-migrate null`, `query-status null`, `query-status null`}
	if strings.Join(f.calls, "\n") != strings.Join(want, "\n") || f.files != 1 {
		t.Fatalf("calls\n%s\nwant\n%s", strings.Join(f.calls, "\n"), strings.Join(want, "\n"))
	}
}

func TestLoadDeviceStateRefusesRunningDomain(t *testing.T) {
	f := &fakeMonitor{reply: func(_ int, execute string, _ any) (any, error) {
		return map[string]any{"running": true, "status": "running"}, nil
	}}
	err := New(f).LoadDeviceState(context.Background(), "vm", tempFile(t))
	if !errors.Is(err, xen.ErrState) || !strings.Contains(err.Error(), "Incoming") {
		t.Fatalf("want ErrState pointing at Incoming, got %v", err)
	}
	if f.files != 0 {
		t.Fatal("a descriptor was passed to a domain that cannot use it")
	}
}

func TestNilFiles(t *testing.T) {
	c := New(&fakeMonitor{reply: func(int, string, any) (any, error) { return struct{}{}, nil }})
	if _, err := c.SaveDeviceState(context.Background(), "vm", nil); err == nil {
		t.Error("SaveDeviceState(nil): want an error")
	}
	if err := c.LoadDeviceState(context.Background(), "vm", nil); err == nil {
		t.Error("LoadDeviceState(nil): want an error")
	}
}
