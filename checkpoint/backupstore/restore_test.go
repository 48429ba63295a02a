package backupstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// dirDigest hashes every file name and content under dir: a restore must
// leave it unchanged.
func dirDigest(t *testing.T, dir string) [32]byte {
	t.Helper()
	h := sha256.New()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		h.Write([]byte(e.Name()))
		h.Write(b)
	}
	var d [32]byte
	copy(d[:], h.Sum(nil))
	return d
}

// TestRestoreMapAndRead: the map lists exactly the non-zero pages with the
// epoch that last wrote each; zeros written by the host are zero pages;
// ReadRestore returns the image with the stored sums, hands back a damaged
// page as read (with the sum it fails) instead of refusing, and changes
// nothing in the store.
func TestRestoreMapAndRead(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{})
	defer s.Close()
	v, err := s.VM("vm", testPages*PageSize, true)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := writeEpoch(t, v, 1).Commit(ctx, false); err != nil {
		t.Fatal(err)
	}
	ep := writeEpoch(t, v, 2)
	// Epoch 2 also zeroes pages 10..13 (after its pattern, so they end zero).
	if err := ep.WriteExtent(10*PageSize, make([]byte, 4*PageSize)); err != nil {
		t.Fatal(err)
	}
	if err := ep.WriteState(0, []byte("state")); err != nil {
		t.Fatal(err)
	}
	if _, err := ep.Commit(ctx, true); err != nil {
		t.Fatal(err)
	}
	want := model(2)
	clear(want[10*PageSize : 14*PageSize])
	last := make([]uint64, testPages)
	for e := uint64(1); e <= 2; e++ {
		for _, x := range pattern(e) {
			for p := x[0]; p < x[0]+x[1]; p++ {
				last[p] = e
			}
		}
	}
	for p := 10; p < 14; p++ {
		last[p] = 2
	}

	m, rm, err := v.RestoreMap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m.Epoch != 2 || rm.MaxEpoch != 2 || rm.Unknown != 0 {
		t.Fatalf("manifest epoch %d, map max epoch %d unknown %d", m.Epoch, rm.MaxEpoch, rm.Unknown)
	}
	inRun := make([]uint64, testPages)
	var pages int64
	for i, r := range rm.Runs {
		if i > 0 && rm.Runs[i-1].First+rm.Runs[i-1].Count > r.First {
			t.Fatalf("runs overlap or are unordered at %d", i)
		}
		for p := r.First; p < r.First+r.Count; p++ {
			inRun[p] = r.Epoch
		}
		pages += r.Count
	}
	if pages != rm.Pages {
		t.Fatalf("runs hold %d pages, map says %d", pages, rm.Pages)
	}
	for p := 0; p < testPages; p++ {
		zero := bytes.Equal(want[p*PageSize:(p+1)*PageSize], make([]byte, PageSize))
		switch {
		case zero && inRun[p] != 0:
			t.Fatalf("zero page %d in a run", p)
		case !zero && inRun[p] != last[p]:
			t.Fatalf("page %d: run epoch %d, last written in %d", p, inRun[p], last[p])
		}
	}
	t.Logf("%d runs, %d of %d pages to bring", len(rm.Runs), rm.Pages, testPages)

	before := dirDigest(t, filepath.Join(dir, "vm"))
	got := make([]byte, testPages*PageSize)
	info := make([]PageInfo, testPages)
	for _, seq := range []bool{false, true} {
		if err := v.ReadRestore(ctx, got, 0, info, seq); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("sequential=%v: image differs", seq)
		}
		for p := range info {
			if crc(got[p*PageSize:(p+1)*PageSize]) != info[p].CRC || info[p].Epoch != last[p] {
				t.Fatalf("page %d: info %+v, last written in %d", p, info[p], last[p])
			}
		}
	}
	if err := v.ReadRestore(ctx, got[:PageSize], testPages*PageSize, info[:1], false); err == nil {
		t.Fatal("read past the image accepted")
	}
	if dirDigest(t, filepath.Join(dir, "vm")) != before {
		t.Fatal("restore reads changed the store")
	}

	// A flipped bit: ReadAt refuses, ReadRestore hands the page back with
	// the sum it fails.
	x := rm.Runs[0].First
	f, _ := os.OpenFile(filepath.Join(dir, "vm", "image"), os.O_RDWR, 0)
	b := make([]byte, 1)
	f.ReadAt(b, x*PageSize+77)
	f.WriteAt([]byte{b[0] ^ 4}, x*PageSize+77)
	f.Close()
	if _, err := v.ReadAt(make([]byte, PageSize), x*PageSize); err == nil {
		t.Fatal("ReadAt served a damaged page")
	}
	pg := make([]byte, PageSize)
	if err := v.ReadRestore(ctx, pg, x*PageSize, info[:1], false); err != nil {
		t.Fatal(err)
	}
	if crc(pg) == info[0].CRC {
		t.Fatal("damaged page matches its stored sum")
	}

	// Entries from before epochs were recorded: epoch unknown.
	binary.BigEndian.PutUint32(v.sums[x*sumEntry+4:], flagWritten)
	if _, rm, _ := v.RestoreMap(ctx); rm.Unknown != 1 {
		t.Fatalf("old-format entry: unknown %d", rm.Unknown)
	}
}
