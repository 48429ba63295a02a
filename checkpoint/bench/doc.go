// Package bench measures the memory plane end to end. Run with
//
//	go test -run '^$' -bench . -benchtime 1x -count 1 ./checkpoint/bench/
//
// Every figure is printed as "bench: NAME VALUE UNIT"; ratios are against
// a baseline measured in the same run.
package bench
