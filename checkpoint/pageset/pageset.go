package pageset

import "math/bits"

// Set is a bitmap of n pages. The zero value is an empty set of size 0.
// Not safe for concurrent use.
type Set struct {
	w []uint64
	n int64
}

// New makes an empty set of n pages.
func New(n int64) *Set { return &Set{w: make([]uint64, (n+63)/64), n: n} }

// Len is the number of pages the set can hold.
func (s *Set) Len() int64 { return s.n }

// AddRange marks pages [first, first+count); pages past the end are ignored.
func (s *Set) AddRange(first, count int64) {
	for p := first; p < first+count && p < s.n; p++ {
		if p >= 0 {
			s.w[p/64] |= 1 << (p % 64)
		}
	}
}

// Has reports whether page p is marked.
func (s *Set) Has(p int64) bool {
	return p >= 0 && p < s.n && s.w[p/64]&(1<<(p%64)) != 0
}

// Union adds every page of o (same size) to s.
func (s *Set) Union(o *Set) {
	for i := range s.w {
		if i < len(o.w) {
			s.w[i] |= o.w[i]
		}
	}
}

// Count is the number of marked pages.
func (s *Set) Count() int64 {
	var c int
	for _, w := range s.w {
		c += bits.OnesCount64(w)
	}
	return int64(c)
}

// Clear unmarks every page.
func (s *Set) Clear() { clear(s.w) }

// Runs calls fn for each maximal run of marked pages, in order, with runs
// cut at maxPages. fn returning false stops the walk.
func (s *Set) Runs(maxPages int64, fn func(first, count int64) bool) {
	var start, n int64 = -1, 0
	for p := int64(0); p < s.n; p++ {
		if s.w[p/64] == 0 && p%64 == 0 {
			if start >= 0 {
				if !fn(start, n) {
					return
				}
				start, n = -1, 0
			}
			p += 63
			continue
		}
		if s.Has(p) {
			if start < 0 {
				start = p
			}
			n++
			if n == maxPages {
				if !fn(start, n) {
					return
				}
				start, n = -1, 0
			}
			continue
		}
		if start >= 0 {
			if !fn(start, n) {
				return
			}
			start, n = -1, 0
		}
	}
	if start >= 0 {
		fn(start, n)
	}
}
