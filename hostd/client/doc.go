// Package client is the Go client of hostd's socket API: hostctl, the
// integration tests and the benchmarks all drive the daemon through it, so
// they exercise exactly what an external scheduler would.
package client
