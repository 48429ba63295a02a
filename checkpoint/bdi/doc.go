// Package bdi controls and observes a Linux backing device (a "bdi"): the
// unit the kernel's dirty-page accounting and writeback throttling work on.
// Each memfs mount is one, so each VM gets its own dirty limit; this package
// is the small sysfs/debugfs vocabulary memfs uses to set it and tests use
// to watch it.
package bdi
