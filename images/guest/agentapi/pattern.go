package agentapi

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// PageSize is the unit of the pattern: one x86 page.
const PageSize = 4096

// PagesPerMiB is the number of pattern pages in one MiB.
const PagesPerMiB = (1 << 20) / PageSize

// PageSeed is the SplitMix64 starting state of page i of pass p.
func PageSeed(seed, pass, page uint64) uint64 {
	return seed*0x9E3779B97F4A7C15 ^ (pass+1)*0xBF58476D1CE4E5B9 ^ (page+1)*0x94D049BB133111EB
}

// FillPage writes page `page` of pass `pass` into buf, which must be
// PageSize bytes. The agent writes guest memory with it and the host
// recomputes expected contents with it: one function, so they cannot drift.
func FillPage(buf []byte, seed, pass, page uint64) {
	_ = buf[PageSize-1]
	s := PageSeed(seed, pass, page)
	for off := 0; off < PageSize; off += 8 {
		s += 0x9E3779B97F4A7C15
		z := s
		z = (z ^ z>>30) * 0xBF58476D1CE4E5B9
		z = (z ^ z>>27) * 0x94D049BB133111EB
		binary.LittleEndian.PutUint64(buf[off:], z^z>>31)
	}
}

// ExpectedChecksum is the SHA-256 of a region of sizeMiB written with seed
// by a writer that completed passesDone passes and is pageInPass pages into
// the next (see the package doc).
func ExpectedChecksum(sizeMiB, seed, passesDone, pageInPass uint64) ([32]byte, error) {
	pages := sizeMiB * PagesPerMiB
	if sizeMiB == 0 || sizeMiB > MaxRegionMiB {
		return [32]byte{}, fmt.Errorf("expected checksum: size_mib %d not in [1, %d]", sizeMiB, MaxRegionMiB)
	}
	if pageInPass >= pages {
		return [32]byte{}, fmt.Errorf("expected checksum: page_in_pass %d not below %d pages", pageInPass, pages)
	}
	h := sha256.New()
	buf := make([]byte, PageSize)
	zero := make([]byte, PageSize)
	for i := uint64(0); i < pages; i++ {
		switch {
		case i < pageInPass:
			FillPage(buf, seed, passesDone, i)
			h.Write(buf)
		case passesDone > 0:
			FillPage(buf, seed, passesDone-1, i)
			h.Write(buf)
		default:
			h.Write(zero)
		}
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, nil
}
