package pageset

import (
	"fmt"
	"testing"
)

func TestRuns(t *testing.T) {
	s := New(300)
	s.AddRange(1, 3)
	s.AddRange(63, 3)
	s.AddRange(200, 10)
	s.AddRange(299, 5) // clipped at the end
	var got []string
	s.Runs(4, func(f, n int64) bool { got = append(got, fmt.Sprintf("%d+%d", f, n)); return true })
	want := "[1+3 63+3 200+4 204+4 208+2 299+1]"
	if fmt.Sprint(got) != want {
		t.Fatalf("runs %v, want %s", got, want)
	}
	if s.Count() != 3+3+10+1 {
		t.Fatalf("count %d", s.Count())
	}
	o := New(300)
	o.AddRange(0, 1)
	s.Union(o)
	if !s.Has(0) || s.Has(4) {
		t.Fatal("union/has")
	}
	s.Clear()
	if s.Count() != 0 {
		t.Fatal("clear")
	}
}
