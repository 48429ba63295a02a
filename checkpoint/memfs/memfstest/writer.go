package memfstest

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"hostd/checkpoint/bdi"
)

const envSpec = "HOSTD_MEMFSTEST_WRITER"

// Spec says what the writer does.
type Spec struct {
	Path string
	Size int64
	// Mode: "scribble" writes Count random 64-byte runs (seeded) within
	// the first Span bytes (default all) then fsyncs; "passes" stores one
	// byte into every page, Passes times over the whole file, then fsyncs;
	// "fill" writes every byte of every page, Passes times; "read" reads
	// the first 16 bytes of each page in Pages; "hash" reads each page in
	// Pages (all pages if none) through the mapping and reports its
	// CRC-32C in Sums; "pread" does the same with pread(2) instead of the
	// mapping and reports each page's error in Errors (so a refused page
	// is an EIO there, not a SIGBUS); "stamp" fills each page in Pages
	// with the byte Seed through the mapping.
	Mode   string
	Span   int64
	Seed   uint64
	Count  int
	Passes int
	Pages  []int64
	// Lock mlocks the mapping, as QEMU's mem-lock does.
	Lock bool
	// NoSync skips the final fsync.
	NoSync bool
	// BDI, if set, is the mount's backing device: the writer reads its
	// dirty + writeback bytes just before the final fsync.
	BDI string
}

// Result is what the writer reports.
type Result struct {
	Dirty time.Duration // time spent storing
	Fsync time.Duration // the final fsync (the flush barrier)
	Bytes int64         // bytes of pages dirtied (pages x passes x 4096)
	Heads []string      // "read" mode: first bytes of each page, hex
	Sums  []uint32      // "hash" and "pread": CRC-32C of each page
	// Errors is "pread"'s error per page ("" for none).
	Errors []string
	// UnflushedAtSync is the BDI's dirty + writeback bytes when the final
	// fsync began (-1 if not observed).
	UnflushedAtSync int64
	Error           string
}

// Main runs the writer if this process was started as one and exits; it
// returns otherwise. Call it first in TestMain.
func Main() {
	s := os.Getenv(envSpec)
	if s == "" {
		return
	}
	var spec Spec
	var res Result
	if err := json.Unmarshal([]byte(s), &spec); err != nil {
		res.Error = err.Error()
	} else {
		res = run(spec)
	}
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
	if res.Error != "" {
		os.Exit(1)
	}
	os.Exit(0)
}

// Pattern returns the expected file content after "scribble" with seed and
// count on a zeroed file of size bytes (ignoring earlier content: apply to
// a copy of the previous content).
func Pattern(prev []byte, seed uint64, count int) {
	r := rand.New(rand.NewPCG(seed, 7))
	size := len(prev)
	for i := 0; i < count; i++ {
		off := r.IntN(size - 64)
		v := byte(r.IntN(255) + 1)
		for j := 0; j < 64; j++ {
			prev[off+j] = v
		}
	}
}

func run(spec Spec) (res Result) {
	f, err := os.OpenFile(spec.Path, os.O_RDWR, 0)
	if err != nil {
		res.Error = err.Error()
		return
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, int(spec.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		res.Error = "mmap: " + err.Error()
		return
	}
	defer unix.Munmap(m)
	if spec.Lock {
		if err := unix.Mlock(m); err != nil {
			res.Error = "mlock: " + err.Error()
			return
		}
	}
	t0 := time.Now()
	switch spec.Mode {
	case "scribble":
		r := rand.New(rand.NewPCG(spec.Seed, 7))
		span := len(m)
		if spec.Span > 0 && spec.Span < spec.Size {
			span = int(spec.Span)
		}
		for i := 0; i < spec.Count; i++ {
			off := r.IntN(span - 64)
			v := byte(r.IntN(255) + 1)
			for j := 0; j < 64; j++ {
				m[off+j] = v
			}
		}
		res.Bytes = int64(spec.Count) * 64
	case "passes":
		for p := 0; p < spec.Passes; p++ {
			for off := 0; off < len(m); off += 4096 {
				m[off] = byte(p + 1)
			}
		}
		res.Bytes = int64(spec.Passes) * spec.Size
	case "fill":
		page := make([]byte, 4096)
		for p := 0; p < spec.Passes; p++ {
			for i := range page {
				page[i] = byte(p + i)
			}
			for off := 0; off < len(m); off += 4096 {
				copy(m[off:off+4096], page)
			}
		}
		res.Bytes = int64(spec.Passes) * spec.Size
	case "read":
		for _, p := range spec.Pages {
			res.Heads = append(res.Heads, fmt.Sprintf("%x", m[p*4096:p*4096+16]))
		}
	case "hash":
		pages := spec.Pages
		if len(pages) == 0 {
			for p := int64(0); p < spec.Size/4096; p++ {
				pages = append(pages, p)
			}
		}
		tab := crc32.MakeTable(crc32.Castagnoli)
		for _, p := range pages {
			res.Sums = append(res.Sums, crc32.Checksum(m[p*4096:(p+1)*4096], tab))
		}
	case "pread":
		tab := crc32.MakeTable(crc32.Castagnoli)
		b := make([]byte, 4096)
		for _, p := range spec.Pages {
			var msg string
			var sum uint32
			if _, err := f.ReadAt(b, p*4096); err != nil {
				msg = err.Error()
			} else {
				sum = crc32.Checksum(b, tab)
			}
			res.Sums = append(res.Sums, sum)
			res.Errors = append(res.Errors, msg)
		}
	case "stamp":
		for _, p := range spec.Pages {
			for i := p * 4096; i < (p+1)*4096; i++ {
				m[i] = byte(spec.Seed)
			}
		}
		res.Bytes = int64(len(spec.Pages)) * 4096
	default:
		res.Error = "unknown mode " + spec.Mode
		return
	}
	res.Dirty = time.Since(t0)
	res.UnflushedAtSync = -1
	if spec.BDI != "" {
		if n, ok := (bdi.Dev{Name: spec.BDI}).Unflushed(); ok {
			res.UnflushedAtSync = n
		}
	}
	if !spec.NoSync {
		t1 := time.Now()
		if err := f.Sync(); err != nil {
			res.Error = "fsync: " + err.Error()
			return
		}
		res.Fsync = time.Since(t1)
	}
	return res
}

// Run starts the writer (this executable, re-executed) and waits for its
// result. ctx bounds it: a writer stuck on a dead mount is killed.
func Run(ctx context.Context, spec Spec) (Result, error) {
	b, _ := json.Marshal(spec)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$", "-test.bench=^$")
	cmd.Env = append(os.Environ(), envSpec+"="+string(b))
	out, err := cmd.Output()
	var res Result
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if jerr := json.Unmarshal([]byte(lines[len(lines)-1]), &res); jerr != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr[:min(len(ee.Stderr), 300)] // the cause, not every goroutine
		}
		return res, fmt.Errorf("writer %s: %v (output %q, stderr %q)", spec.Mode, err, out, stderr)
	}
	if res.Error != "" {
		return res, fmt.Errorf("writer %s: %s", spec.Mode, res.Error)
	}
	if err != nil {
		return res, fmt.Errorf("writer %s: %w", spec.Mode, err)
	}
	return res, nil
}
