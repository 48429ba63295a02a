package protect

import "sort"

// Claim is one VM's part in sharing the host's backup bandwidth.
type Claim struct {
	Weight float64 // > 0
	// Demand is what the VM would send if unlimited (bytes/s); +Inf for a
	// VM with a backlog (its writer is being throttled or its queue full).
	Demand float64
}

// Shares divides total bytes/s among claims by weighted max-min fairness:
// no VM gets more than it demands, and what one leaves unused goes to the
// others in proportion to their weights. So one VM's flush never starves
// another (each is guaranteed its weighted share when it needs it) and no
// bandwidth is wasted while others want it.
func Shares(total float64, claims []Claim) []float64 {
	out := make([]float64, len(claims))
	if total <= 0 || len(claims) == 0 {
		return out
	}
	// Water-filling: satisfy the smallest demands per unit of weight first.
	idx := make([]int, 0, len(claims))
	var wsum float64
	for i, c := range claims {
		if c.Weight > 0 {
			idx = append(idx, i)
			wsum += c.Weight
		}
	}
	sort.Slice(idx, func(a, b int) bool {
		ca, cb := claims[idx[a]], claims[idx[b]]
		return ca.Demand/ca.Weight < cb.Demand/cb.Weight
	})
	left := total
	for k, i := range idx {
		c := claims[i]
		fair := left * c.Weight / wsum
		give := min(fair, max(c.Demand, 0))
		out[i] = give
		left -= give
		wsum -= c.Weight
		if k == len(idx)-1 || wsum <= 0 {
			break
		}
	}
	return out
}
