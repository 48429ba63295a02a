// Package events is hostd's event broker: VM lifecycle changes, job progress
// and (from later subsystems) termination notices, overloads and connector
// retargets are published here and streamed to the scheduler as
// newline-delimited JSON by GET /v1/events.
//
// Publishing never blocks the publisher: each subscriber has a bounded
// buffer, and a subscriber that falls behind gets a "dropped" marker with the
// count instead of stalling the daemon.
package events
