package memfs

import (
	"bytes"
	"context"
	"hash/crc32"
	"strconv"
	"testing"
	"time"

	"hostd/checkpoint/memfs/memfstest"
)

// TestPreloadNeverRollsBack: processes write some pages (through fsync,
// or left to the kernel's writeback at close), then Preload sweeps the
// whole file: the written pages keep the processes' content, the others
// come from the Source and are then cached (a reader faults none of them).
func TestPreloadNeverRollsBack(t *testing.T) {
	const size = 8 << 20
	src := &patternSource{}
	fs := mount(t, Options{Size: size, Sink: FileSink{sinkFile(t, size)}, Source: src})
	synced := []int64{3, 4, 100, 2047}
	unsynced := []int64{5, 900, 901}
	writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "stamp", Seed: 0x5a, Pages: synced})
	writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "stamp", Seed: 0xa5, Pages: unsynced, NoSync: true})
	for _, p := range append(synced, unsynced...) {
		if !fs.Touched(p) {
			t.Fatalf("page %d written by the process is not touched", p)
		}
	}
	if fs.Touched(1500) {
		t.Fatal("page 1500 touched before anyone read it")
	}
	res, err := fs.Preload(context.Background(), 0, size)
	if err != nil {
		t.Fatal(err)
	}
	if res.Skipped < int64(len(synced)+len(unsynced)) || res.Read+res.Skipped != size/PageSize {
		t.Fatalf("preload %+v", res)
	}
	reads := src.count()
	got, err := memfstest.Run(context.Background(), memfstest.Spec{Path: fs.Path(), Size: size, Mode: "hash", NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	tab := crc32.MakeTable(crc32.Castagnoli)
	page := make([]byte, PageSize)
	want := func(p int64) uint32 {
		for _, q := range synced {
			if q == p {
				return crc32.Checksum(bytes.Repeat([]byte{0x5a}, PageSize), tab)
			}
		}
		for _, q := range unsynced {
			if q == p {
				return crc32.Checksum(bytes.Repeat([]byte{0xa5}, PageSize), tab)
			}
		}
		clear(page)
		copy(page, strconv.FormatInt(p, 10)+"|")
		return crc32.Checksum(page, tab)
	}
	for p, s := range got.Sums {
		if s != want(int64(p)) {
			t.Fatalf("page %d after preload: crc %08x, want %08x", p, s, want(int64(p)))
		}
	}
	if src.count() != reads {
		t.Fatalf("the reader faulted %d reads after the preload", src.count()-reads)
	}
	t.Logf("preload %+v; stats %+v", res, fs.Stats())
}

// TestConcurrentFirstPreloadsWithDirtyPages: the first preloads race to
// open the preload handle while the file has dirty pages (a guest ran on
// it before the prefetch began). A losing handle's close makes the kernel
// write those pages back through memfs; closed under memfs's lock, that
// deadlocked every WRITE and then the whole mount.
func TestConcurrentFirstPreloadsWithDirtyPages(t *testing.T) {
	const size = 16 << 20
	fs := mount(t, Options{Size: size, Sink: FileSink{sinkFile(t, size)}, Source: &patternSource{}})
	var dirty []int64
	for p := int64(0); p < size/PageSize; p += 4 {
		dirty = append(dirty, p)
	}
	writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "stamp", Seed: 0x3c, Pages: dirty, NoSync: true})
	const workers = 8
	errs := make(chan error, workers)
	for i := range workers {
		go func() {
			chunk := int64(size / workers)
			_, err := fs.Preload(context.Background(), int64(i)*chunk, chunk)
			errs <- err
		}()
	}
	deadline := time.After(2 * time.Minute)
	for range workers {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatal(err)
			}
		case <-deadline:
			t.Fatal("concurrent first preloads never returned: deadlocked")
		}
	}
	got := writer(t, memfstest.Spec{Path: fs.Path(), Size: size, Mode: "hash", Pages: dirty[:8], NoSync: true})
	want := crc32.Checksum(bytes.Repeat([]byte{0x3c}, PageSize), crc32.MakeTable(crc32.Castagnoli))
	for i, s := range got.Sums {
		if s != want {
			t.Fatalf("dirty page %d lost its content to a preload: crc %08x", dirty[i], s)
		}
	}
}
