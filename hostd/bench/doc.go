// Package bench holds hostd's benchmarks, one subpackage per area (platform,
// and later checkpoint, restore, swap), each a `go test -bench` that prints
// its figures as `bench: NAME VALUE UNIT` lines, every ratio taken against
// a baseline measured in the same run. `make bench` runs them all.
package bench
