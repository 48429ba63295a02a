// Package scrape is hostd's optional read-only metrics listener: GET
// /metrics over TCP ([api] metrics_listen) for a Prometheus that must not
// be able to drive hostd. The admin socket serves /metrics too, but whoever
// can reach that socket can also delete VMs; this listener serves nothing
// else, and no method but GET and HEAD.
package scrape
