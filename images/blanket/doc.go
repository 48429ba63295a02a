// Package blanket holds the provisioning of a blanket host
// (provision.sh: Debian packages, libvirt set-up) and check-go.sh, which
// every Makefile build runs first so that a missing or too old Go is a
// message rather than a build error. There is no Go code here besides the
// test of check-go.sh.
package blanket
