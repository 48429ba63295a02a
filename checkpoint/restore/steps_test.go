package restore

import (
	"testing"

	"hostd/checkpoint/wire"
)

// TestSteps: windows cover every run exactly once, never exceed the chunk,
// and span short gaps (zero pages) between runs in order.
func TestSteps(t *testing.T) {
	runs := []wire.Run{{First: 0, Count: 3, Epoch: 1}, {First: 5, Count: 2, Epoch: 1}, {First: 100, Count: 20, Epoch: 1}, {First: 1, Count: 1, Epoch: 9}}
	got := steps(runs, 8)
	want := []step{{0, 7}, {100, 108}, {108, 116}, {116, 120}, {1, 2}}
	if len(got) != len(want) {
		t.Fatalf("steps %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("steps %v, want %v", got, want)
		}
	}
	order := byRecency(runs)
	if order[0].Epoch != 9 || order[1].First != 0 || order[3].First != 100 {
		t.Fatalf("recency order %v", order)
	}
}
