// Package integration tests hostd end to end: the real hostd binary, the
// real libvirtd, real TCG guests booting the test image, driven only
// through the socket API, including the failure paths (bad input, libvirtd
// down, kill -9 of the daemon while guests run).
package integration
