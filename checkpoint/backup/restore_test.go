package backup_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/pki"
	"hostd/checkpoint/wire"
)

func (e *env) restoreConn(t testing.TB, vm string, epoch uint64, resume bool) (*backupclient.RestoreConn, error) {
	tc, err := pki.DirClientConfig(e.pki, "host1", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return backupclient.DialRestore(context.Background(), backupclient.RestoreConfig{
		Addr: e.addr, TLS: tc, VMID: vm, Epoch: epoch, Resume: resume, ImageSize: imgSize, Logger: quiet(), DialTimeout: 5 * time.Second,
	})
}

func storeDigest(t *testing.T, dir string) [32]byte {
	t.Helper()
	h := sha256.New()
	ents, _ := os.ReadDir(dir)
	for _, de := range ents {
		b, err := os.ReadFile(filepath.Join(dir, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		h.Write([]byte(de.Name()))
		h.Write(b)
	}
	var d [32]byte
	copy(d[:], h.Sum(nil))
	return d
}

// readAllRuns fetches every page of the map through rc (pipelined from a
// few goroutines) and returns the image it describes: zero elsewhere. It
// fails if a page disagrees with its stored sum.
func readAllRuns(t *testing.T, rc *backupclient.RestoreConn) []byte {
	t.Helper()
	img := make([]byte, imgSize)
	info := rc.Info()
	var wg sync.WaitGroup
	errs := make(chan error, len(info.Runs))
	for i, r := range info.Runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := img[r.First*wire.PageSize : (r.First+uint64(r.Count))*wire.PageSize]
			sums := make([]wire.PageSum, r.Count)
			if err := rc.FetchPages(context.Background(), int64(r.First)*wire.PageSize, p, sums, i%2 == 0); err != nil {
				errs <- err
				return
			}
			for j, s := range sums {
				if wire.Checksum(p[j*wire.PageSize:(j+1)*wire.PageSize]) != s.CRC || s.Epoch == 0 || s.Epoch > info.Epoch {
					errs <- errors.New("page fails its stored sum or epoch")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return img
}

// TestRestoreSessionReadOnly: a restore session serves the restore point
// (map, device state, pages with their stored sums) while the VM's writer
// session stays connected and keeps committing; the restore changes
// nothing in the store.
func TestRestoreSessionReadOnly(t *testing.T) {
	e := newEnv(t)
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	defer s.Close()
	ctx := context.Background()
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	if err := s.SendPages(ctx, 0, full); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(ctx, false); err != nil {
		t.Fatal(err)
	}
	// Some pages become zero in the restore point: they must not be in
	// the map.
	zeros := make([]byte, 16*4096)
	f.WriteAt(zeros, 4096)
	if err := s.SendPages(ctx, 4096, zeros); err != nil {
		t.Fatal(err)
	}
	if err := s.SendDeviceState(ctx, []byte("device state 2")); err != nil {
		t.Fatal(err)
	}
	ep, err := s.Commit(ctx, true)
	if err != nil {
		t.Fatal(err)
	}

	rc, err := e.restoreConn(t, "vm1", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	// The welcome came after the commit's apply and cleanup (the map waits
	// for them): from here the store only changes if someone writes.
	before := storeDigest(t, filepath.Join(e.store, "vm1"))
	info := rc.Info()
	if info.Epoch != ep || info.Committed != ep {
		t.Fatalf("info %+v, want epoch %d", info, ep)
	}
	want := make([]byte, imgSize)
	f.ReadAt(want, 0)
	var nonZero int64
	for p := 0; p < imgSize/4096; p++ {
		if !bytes.Equal(want[p*4096:(p+1)*4096], make([]byte, 4096)) {
			nonZero++
		}
	}
	if info.Pages != nonZero {
		t.Fatalf("map has %d pages, image %d non-zero", info.Pages, nonZero)
	}
	state, err := rc.FetchState(ctx)
	if err != nil || string(state) != "device state 2" {
		t.Fatalf("state %q %v", state, err)
	}
	if !bytes.Equal(readAllRuns(t, rc), want) {
		t.Fatal("restored image differs")
	}
	rtt, err := rc.Ping(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("map %d runs / %d pages; ping %v", len(info.Runs), info.Pages, rtt)
	if storeDigest(t, filepath.Join(e.store, "vm1")) != before {
		t.Fatal("the restore session changed the store")
	}

	// The writer was never taken over: it goes on committing, and the
	// restore point it overwrites can no longer be restored fresh, while
	// the restore in progress (resume) still reads unchanged pages.
	if err := sendExtents(t, s, f, scribble(t, f, 3)); err != nil {
		t.Fatal(err)
	}
	if ep2, err := s.Commit(ctx, false); err != nil || ep2 != ep+1 {
		t.Fatalf("writer commit after restore: %d %v", ep2, err)
	}
	_, err = e.restoreConn(t, "vm1", 0, false)
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wire.CodeNotFound {
		t.Fatalf("fresh restore after pages moved on: %v", err)
	}
	t.Logf("fresh restore refused: %v", err)
	rr, err := e.restoreConn(t, "vm1", ep, true)
	if err != nil {
		t.Fatal(err)
	}
	defer rr.Close()
	pg, sums := make([]byte, 4096), make([]wire.PageSum, 1)
	if err := rr.FetchPages(ctx, 0, pg, sums, false); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed session: page 0 epoch %d", sums[0].Epoch)
}

// TestRestoreRefusals: unknown VM, an epoch the backup does not keep, a
// VM without a restore point, and frames a restore session must not take.
func TestRestoreRefusals(t *testing.T) {
	e := newEnv(t)
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	defer s.Close()
	ctx := context.Background()
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	s.SendPages(ctx, 0, full)
	if _, err := s.Commit(ctx, false); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		vm    string
		epoch uint64
	}{"unknown vm": {"nope", 0}, "no restore point": {"vm1", 0}, "other epoch": {"vm1", 7}} {
		_, err := e.restoreConn(t, c.vm, c.epoch, false)
		var we *wire.Error
		if !errors.As(err, &we) || we.Code != wire.CodeNotFound {
			t.Fatalf("%s: %v", name, err)
		}
		t.Logf("%s: %v", name, err)
	}
	if _, err := os.Stat(filepath.Join(e.store, "nope")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a restore of an unknown vm created it")
	}
	s.SendDeviceState(ctx, []byte("st"))
	if _, err := s.Commit(ctx, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.restoreConn(t, "vm1", 7, false); err == nil || !strings.Contains(err.Error(), "keeps only its newest restore point, epoch 2") {
		t.Fatalf("restore of an epoch not held: %v", err)
	}
	rc, err := e.restoreConn(t, "vm1", 2, false)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	// An extent in a restore session is a protocol error, and the
	// connection is then broken for every later call.
	pg := bytes.Repeat([]byte{1}, 4096)
	tc, _ := pki.DirClientConfig(e.pki, "host1", "127.0.0.1")
	raw, err := dialRaw(tc, e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.Write(must(wire.AppendFrame(nil, &wire.RestoreHello{Version: wire.Version, VMID: "vm1"})))
	raw.Write(must(wire.AppendFrame(nil, &wire.Extent{Epoch: 3, Offset: 0, CRC: wire.Checksum(pg), Data: pg})))
	r := wire.NewReader(raw)
	var code wire.ErrorCode
	for i := 0; i < 10; i++ {
		m, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		if em, ok := m.(*wire.Error); ok {
			code = em.Code
			break
		}
	}
	if code != wire.CodeProtocol {
		t.Fatalf("extent in restore session: code %d", code)
	}
	if err := rc.FetchPages(ctx, imgSize-4096, make([]byte, 4096), make([]wire.PageSum, 1), false); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreServesDamagedPageForClientToRefuse: a bit flipped in the
// backup's image file arrives intact over the wire (the frame's CRC holds)
// but fails the page's stored sum, which pins the damage on the backup's
// copy.
func TestRestoreServesDamagedPageForClientToRefuse(t *testing.T) {
	e := newEnv(t)
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	ctx := context.Background()
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	s.SendPages(ctx, 0, full)
	s.SendDeviceState(ctx, []byte("st"))
	if _, err := s.Commit(ctx, true); err != nil {
		t.Fatal(err)
	}
	s.Close()
	rc, err := e.restoreConn(t, "vm1", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	page := int64(rc.Info().Runs[0].First)
	img, err := os.OpenFile(filepath.Join(e.store, "vm1", "image"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	img.ReadAt(b, page*4096+1000)
	img.WriteAt([]byte{b[0] ^ 0x20}, page*4096+1000)
	img.Close()
	p, sums := make([]byte, 8192), make([]wire.PageSum, 2)
	if err := rc.FetchPages(ctx, page*4096, p, sums, false); err != nil {
		t.Fatal(err)
	}
	if wire.Checksum(p[:4096]) == sums[0].CRC {
		t.Fatal("damaged page matches its stored sum")
	}
	if !bytes.Equal(p[4096:], full[(page+1)*4096:(page+2)*4096]) || wire.Checksum(p[4096:]) != sums[1].CRC {
		t.Fatal("the intact neighbour page is wrong")
	}
}

func dialRaw(tc *tls.Config, addr string) (*tls.Conn, error) { return tls.Dial("tcp", addr, tc) }
