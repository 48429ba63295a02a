package protect

import (
	"math"
	"testing"
)

func TestShares(t *testing.T) {
	inf := math.Inf(1)
	cases := []struct {
		name   string
		total  float64
		claims []Claim
		want   []float64
	}{
		{"equal backlogs", 100, []Claim{{1, inf}, {1, inf}}, []float64{50, 50}},
		{"weights", 90, []Claim{{1, inf}, {2, inf}}, []float64{30, 60}},
		{"light user leaves the rest", 100, []Claim{{1, 10}, {1, inf}, {1, inf}}, []float64{10, 45, 45}},
		{"all light", 100, []Claim{{1, 10}, {1, 20}}, []float64{10, 20}},
		{"no limit", 0, []Claim{{1, inf}}, []float64{0}},
		{"zero weight gets nothing", 100, []Claim{{0, inf}, {1, inf}}, []float64{0, 100}},
		{"heavy cannot starve", 100, []Claim{{1, 1e12}, {1, 40}}, []float64{60, 40}},
	}
	for _, c := range cases {
		got := Shares(c.total, c.claims)
		for i := range got {
			if math.Abs(got[i]-c.want[i]) > 1e-9 {
				t.Errorf("%s: got %v, want %v", c.name, got, c.want)
				break
			}
		}
		var sum float64
		for _, g := range got {
			sum += g
		}
		if sum > c.total+1e-9 {
			t.Errorf("%s: handed out %v of %v", c.name, sum, c.total)
		}
	}
}
