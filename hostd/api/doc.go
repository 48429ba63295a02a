// Package api is hostd's REST/JSON interface on a local unix socket: the
// only way the external scheduler (and hostctl) drives the daemon.
//
// It is deliberately thin: it decodes and checks requests, calls the VM
// manager and job registry, and maps their errors to status codes with a
// JSON body that says what was wrong. openapi.yaml beside this file is the
// contract; a test keeps the two in step. Access is root or the hostd group
// only: the socket's mode says so to the filesystem, and every connection's
// peer credentials (SO_PEERCRED) are checked again here.
package api
