// Package bench measures the memory plane end to end. Run with
//
//	go test -run '^$' -bench . -benchtime 1x -count 1 ./checkpoint/bench/
//
// Every figure is printed as "bench: NAME VALUE UNIT"; ratios are against
// a baseline measured in the same run. BenchmarkRestore (restore_test.go)
// measures lazy-restore faults against a plain round trip to the backup,
// and residency with prefetch against a full copy.
package bench
