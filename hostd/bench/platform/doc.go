// Package platform benchmarks the platform: how much hostd adds to booting
// a VM compared with libvirt alone, and what its API costs per request.
package platform
