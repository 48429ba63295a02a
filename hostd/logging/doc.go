// Package logging makes hostd's logger: log/slog records as JSON or text on
// stderr and, when stderr is a systemd journal stream (hostd.service), each
// line prefixed with its syslog priority ("<3>" for errors, sd-daemon(3)),
// so that journald files records under the right priority and
// `journalctl -p warning` finds hostd's warnings. The daemon and its
// memory servers use it.
package logging
