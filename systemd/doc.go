// Package systemd holds hostd's systemd units (hostd.service, sysusers and
// tmpfiles snippets) and the test that checks them with systemd's own
// tools. There is no Go code here: the daemon speaks sd_notify through
// github.com/coreos/go-systemd (see hostd/daemon).
package systemd
