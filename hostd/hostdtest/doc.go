// Package hostdtest runs the real hostd binary against the real libvirtd for
// integration tests and benchmarks: it builds the binaries, writes a
// configuration into a scratch directory, starts the daemon as a child
// process (so a test can kill -9 it), and cleans up the domains a test made.
package hostdtest
