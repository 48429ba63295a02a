// Package memfstest runs the stand-in guest of memfs tests and benchmarks:
// a separate process that maps a RAM file MAP_SHARED and dirties it, as
// QEMU does with memory-backend-file,share=on.
//
// It must be a separate process. A Go process that faults on pages of a
// FUSE file it serves itself deadlocks: a thread blocked in a page fault
// cannot be stopped for garbage collection, so the stop-the-world never
// ends and the FUSE server goroutines never run again to answer the fault.
// (The same holds at exit, where unmapping waits for writeback.)
//
// Tests call Main from TestMain (the test binary re-executes itself as the
// writer) and Run to start one.
package memfstest
