package libvirt

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"hostd/xen"
)

// TestConcurrentCalls defines, reads, lists and undefines domains from many
// goroutines at once while an event subscriber listens (run it with -race),
// and checks every domain's defined and undefined events arrive.
func TestConcurrentCalls(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}

	const n = 8
	base := uniqueName(t)
	dir := shortTempDir(t)
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%d", base, i)
		cleanupDomain(t, d, names[i])
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4*n)
	for i, name := range names {
		wg.Add(2)
		go func() {
			defer wg.Done()
			spec := guestSpec(t, g, name, dir)
			spec.RAMPath = fmt.Sprintf("%s/ram-%d", dir, i)
			if err := d.Define(ctx, spec); err != nil {
				errs <- err
				return
			}
			info, err := d.Domain(ctx, name)
			if err != nil || info.Spec == nil || info.Spec.Name != name {
				errs <- fmt.Errorf("Domain %s: %+v, %v", name, info, err)
				return
			}
			if err := d.Undefine(ctx, name); err != nil {
				errs <- err
			}
		}()
		go func() {
			defer wg.Done()
			if _, err := d.List(ctx); err != nil {
				errs <- err
			}
			if _, err := d.Host(ctx); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	want := map[string]bool{}
	for _, name := range names {
		want[name+" "+xen.EventDefined] = true
		want[name+" "+xen.EventUndefined] = true
	}
	timeout := time.After(30 * time.Second)
	for len(want) > 0 {
		select {
		case ev := <-events:
			delete(want, ev.Domain+" "+ev.Event)
		case <-timeout:
			t.Fatalf("events missing: %v", want)
		}
	}
	for _, name := range names {
		if _, err := d.Domain(ctx, name); !errors.Is(err, xen.ErrNotFound) {
			t.Errorf("%s after undefine: %v", name, err)
		}
	}
}
