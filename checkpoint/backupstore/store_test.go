package backupstore

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const testPages = 1024 // 4 MiB image

// pattern returns the extents epoch e writes: deterministic, so a parent
// process can rebuild what a killed child committed.
func pattern(e uint64) [][2]int {
	r := rand.New(rand.NewPCG(e, 99))
	var ext [][2]int // first page, pages
	for i := 0; i < 24; i++ {
		n := 1 + r.IntN(16)
		ext = append(ext, [2]int{r.IntN(testPages - n), n})
	}
	return ext
}

func fillPage(b []byte, e uint64, p int) {
	binary.BigEndian.PutUint64(b, e)
	binary.BigEndian.PutUint64(b[8:], uint64(p))
	for i := 16; i < len(b); i++ {
		b[i] = byte(int(e)*31 + p + i)
	}
}

func extentData(e uint64, first, n int) []byte {
	d := make([]byte, n*PageSize)
	for i := 0; i < n; i++ {
		fillPage(d[i*PageSize:(i+1)*PageSize], e, first+i)
	}
	return d
}

// model is the image expected after committing epochs 1..upto.
func model(upto uint64) []byte {
	img := make([]byte, testPages*PageSize)
	for e := uint64(1); e <= upto; e++ {
		for _, x := range pattern(e) {
			copy(img[x[0]*PageSize:], extentData(e, x[0], x[1]))
		}
	}
	return img
}

func writeEpoch(t testing.TB, v *VM, e uint64) *Epoch {
	ep, err := v.Begin(e, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range pattern(e) {
		if err := ep.WriteExtent(int64(x[0])*PageSize, extentData(e, x[0], x[1])); err != nil {
			t.Fatal(err)
		}
	}
	return ep
}

func checkImage(t *testing.T, v *VM, upto uint64) {
	t.Helper()
	var buf bytes.Buffer
	if err := v.ReadAll(context.Background(), &buf); err != nil {
		t.Fatal(err)
	}
	want := model(upto)
	if !bytes.Equal(buf.Bytes(), want) {
		for p := 0; p < testPages; p++ {
			if !bytes.Equal(buf.Bytes()[p*PageSize:(p+1)*PageSize], want[p*PageSize:(p+1)*PageSize]) {
				t.Fatalf("image differs from epoch %d at page %d (first bytes %x)", upto, p, buf.Bytes()[p*PageSize:p*PageSize+16])
			}
		}
	}
	// The lazy path must agree page by page.
	pg := make([]byte, 2*PageSize)
	for p := 0; p < testPages; p += 97 {
		if _, err := v.ReadAt(pg[:PageSize], int64(p)*PageSize); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pg[:PageSize], want[p*PageSize:(p+1)*PageSize]) {
			t.Fatalf("ReadAt page %d differs from epoch %d", p, upto)
		}
	}
}

func TestCommitAbortRead(t *testing.T) {
	ctx := context.Background()
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.VM("vm1", 0, false); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown vm: %v", err)
	}
	if _, err := s.VM("../x", testPages*PageSize, true); err == nil {
		t.Fatal("path traversal id accepted")
	}
	v, err := s.VM("vm1", testPages*PageSize, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Begin(2, false); !errors.Is(err, ErrEpoch) {
		t.Fatalf("begin out of order: %v", err)
	}
	ep := writeEpoch(t, v, 1)
	checkImage(t, v, 0) // not visible before commit
	if err := ep.WriteExtent(testPages*PageSize, make([]byte, PageSize)); !errors.Is(err, ErrRange) {
		t.Fatalf("extent past end: %v", err)
	}
	if err := ep.WriteExtent(100, make([]byte, PageSize)); !errors.Is(err, ErrRange) {
		t.Fatalf("unaligned extent: %v", err)
	}
	if _, err := ep.Commit(ctx, true); !errors.Is(err, ErrRange) {
		t.Fatalf("restore point without state: %v", err)
	}
	// That failed commit aborted the epoch; redo it properly.
	ep = writeEpoch(t, v, 1)
	if err := ep.WriteState(0, []byte("cpu+devices")); err != nil {
		t.Fatal(err)
	}
	sum := ep.Summary()
	if sum.Extents != len(pattern(1)) || sum.StateLen != 11 {
		t.Fatalf("summary %+v", sum)
	}
	m, err := ep.Commit(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if !m.Restorable || m.Pages() == 0 {
		t.Fatalf("manifest %+v", m)
	}
	checkImage(t, v, 1)

	ep = writeEpoch(t, v, 2)
	ep.Abort()
	checkImage(t, v, 1)
	ep = writeEpoch(t, v, 2)
	if _, err := ep.Commit(ctx, false); err != nil {
		t.Fatal(err)
	}
	checkImage(t, v, 2)
	st, m2, err := v.DeviceState()
	if err != nil || string(st) != "cpu+devices" || m2.StateEpoch != 1 {
		t.Fatalf("device state %q %+v %v", st, m2, err)
	}
	ents, _ := os.ReadDir(v.dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "image manifest-2 state-1 sums" {
		t.Fatalf("files after commits: %v", names)
	}
}

func TestDetectsCorruptPage(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{})
	v, err := s.VM("vm", testPages*PageSize, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeEpoch(t, v, 1).Commit(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if err := v.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	x := pattern(1)[0]
	f, _ := os.OpenFile(filepath.Join(dir, "vm", "image"), os.O_RDWR, 0)
	f.WriteAt([]byte{0xff}, int64(x[0])*PageSize+100)
	f.Close()
	_, err = v.ReadAt(make([]byte, PageSize), int64(x[0])*PageSize)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("corrupt page read: %v", err)
	}
	if err := v.ReadAll(context.Background(), &bytes.Buffer{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("corrupt full read: %v", err)
	}
	s.Close()
}

// TestMain doubles as the crash-test child: with BACKUPSTORE_CHILD set it
// commits epochs until it reaches the named stage of epoch 3, announces it
// and waits to be killed.
func TestMain(m *testing.M) {
	if spec := os.Getenv("BACKUPSTORE_CHILD"); spec != "" {
		crashChild(spec)
		return
	}
	os.Exit(m.Run())
}

func crashChild(spec string) {
	dir, stage, _ := strings.Cut(spec, ":")
	s, err := Open(dir, Options{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	s.hook = func(at string, epoch uint64) {
		if at == stage && epoch == 3 {
			fmt.Println("at", at)
			// Wait for SIGKILL, but not forever if the parent died.
			time.Sleep(time.Minute)
			os.Exit(3)
		}
	}
	v, err := s.VM("vm", testPages*PageSize, true)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	for epoch := v.CommittedEpoch() + 1; epoch <= 5; epoch++ {
		ep, err := v.Begin(epoch, false)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(2)
		}
		for _, x := range pattern(epoch) {
			if err := ep.WriteExtent(int64(x[0])*PageSize, extentData(epoch, x[0], x[1])); err != nil {
				fmt.Println("error", err)
				os.Exit(2)
			}
		}
		if _, err := ep.Commit(context.Background(), false); err != nil {
			fmt.Println("error", err)
			os.Exit(2)
		}
		fmt.Println("committed", epoch)
	}
	fmt.Println("done")
}

// TestKillMidCommit kills a child process with SIGKILL at each stage of
// writing and committing epoch 3 and checks that the reopened store holds
// exactly the last committed epoch.
func TestKillMidCommit(t *testing.T) {
	cases := []struct {
		stage string
		want  uint64
	}{
		{"extent-written", 2}, // mid-write
		{"before-rename", 2},  // manifest written, not yet renamed
		{"committed", 3},      // commit point passed, nothing applied
		{"mid-apply", 3},      // image half overwritten
		{"applied", 3},        // applied, redo log still there
	}
	for _, c := range cases {
		t.Run(c.stage, func(t *testing.T) {
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "BACKUPSTORE_CHILD="+dir+":"+c.stage)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			sc := bufio.NewScanner(out)
			reached := false
			for sc.Scan() {
				line := sc.Text()
				if strings.HasPrefix(line, "error") {
					t.Fatalf("child: %s", line)
				}
				if line == "at "+c.stage {
					reached = true
					break
				}
			}
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
			if !reached {
				t.Fatalf("child never reached %s", c.stage)
			}
			s, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			v, err := s.VM("vm", testPages*PageSize, false)
			if err != nil {
				t.Fatal(err)
			}
			if got := v.CommittedEpoch(); got != c.want {
				t.Fatalf("after kill at %s: committed %d, want %d", c.stage, got, c.want)
			}
			checkImage(t, v, c.want)
			// The store goes on from there.
			if _, err := writeEpoch(t, v, c.want+1).Commit(ctx, false); err != nil {
				t.Fatal(err)
			}
			checkImage(t, v, c.want+1)
		})
	}
}

// TestDiskFull runs the store on a small tmpfs, filled up by a ballast
// file: an epoch that does not fit fails with ENOSPC and the committed
// epoch stays intact, also after reopen; once space is freed the store
// goes on.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	mnt := t.TempDir()
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=8m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	defer unix.Unmount(mnt, unix.MNT_DETACH)
	ctx := context.Background()
	s, err := Open(mnt, Options{})
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.VM("vm", testPages*PageSize, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeEpoch(t, v, 1).Commit(ctx, false); err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	ballast := filepath.Join(mnt, "ballast")
	if err := os.WriteFile(ballast, make([]byte, int64(st.Bavail)*st.Bsize-512<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	// Epoch 2 overwrites the whole 4 MiB image: more than the disk holds.
	ep, err := v.Begin(2, false)
	if err != nil {
		t.Fatal(err)
	}
	var full error
	for p := 0; p < testPages && full == nil; p += 64 {
		full = ep.WriteExtent(int64(p)*PageSize, extentData(2, p, 64))
	}
	if full == nil {
		_, full = ep.Commit(ctx, false)
	} else {
		ep.Abort()
	}
	if !errors.Is(full, syscall.ENOSPC) {
		t.Fatalf("overfilled epoch: %v, want ENOSPC", full)
	}
	t.Logf("disk full error: %v", full)
	checkImage(t, v, 1)
	s.Close()
	s, err = Open(mnt, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err = s.VM("vm", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if v.CommittedEpoch() != 1 {
		t.Fatalf("after disk full and reopen: epoch %d", v.CommittedEpoch())
	}
	checkImage(t, v, 1)
	os.Remove(ballast)
	if _, err := writeEpoch(t, v, 2).Commit(ctx, false); err != nil {
		t.Fatalf("normal epoch after disk full: %v", err)
	}
	checkImage(t, v, 2)
}

func FuzzManifest(f *testing.F) {
	m := &Manifest{Epoch: 3, ImageSize: 1 << 20, StateEpoch: 2, StateLen: 10, RedoLen: 5,
		Extents: []ExtentSum{{Offset: 4096, PageCRCs: []uint32{1, 2}}}}
	f.Add(m.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeManifest(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not wrapping ErrCorrupt: %v", err)
			}
			return
		}
		if !bytes.Equal(m.encode(), b) {
			t.Fatal("re-encoding differs")
		}
	})
}

func FuzzRedoHeader(f *testing.F) {
	f.Add(appendRedoHeader(nil, 8192, 4096, 0xdeadbeef))
	f.Fuzz(func(t *testing.T, h []byte) {
		if len(h) != redoHeader {
			return
		}
		off, n, c, err := parseRedoHeader(h)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not wrapping ErrCorrupt: %v", err)
			}
			return
		}
		if !bytes.Equal(appendRedoHeader(nil, off, n, c), h) {
			t.Fatal("re-encoding differs")
		}
	})
}
