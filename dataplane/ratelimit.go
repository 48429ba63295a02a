package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RateLimiter caps a device's egress rate with a token-bucket (tbf) root
// qdisc: SpotCheck throttles each VM's share of backup and migration traffic
// so that checkpoints of many VMs cannot starve the guests. The checkpoint
// code limits whichever device carries one VM's stream (its tap, or a
// per-VM veth or macvlan on the underlay).
type RateLimiter struct {
	nl  *netlink.Handle
	log *slog.Logger
}

// NewRateLimiter acts on devices in namespace ns (<= 0: the caller's).
func NewRateLimiter(ns netns.NsHandle, log *slog.Logger) (*RateLimiter, error) {
	var nl *netlink.Handle
	var err error
	if ns > 0 {
		nl, err = netlink.NewHandleAt(ns)
	} else {
		nl, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("open rate limiter: netlink: %w", err)
	}
	if log == nil {
		log = slog.Default()
	}
	return &RateLimiter{nl: nl, log: log.With("component", "ratelimit")}, nil
}

func (r *RateLimiter) Close() { r.nl.Close() }

// rootHandle marks the qdisc as ours, so Clear never removes another's.
var rootHandle = netlink.MakeHandle(0x4d57, 0) // "MW": migration window

// Set limits dev's egress to bytesPerSec, replacing any earlier limit.
func (r *RateLimiter) Set(ctx context.Context, dev string, bytesPerSec uint64) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("rate limit %q: %w", dev, err)
	}
	if bytesPerSec == 0 {
		return fmt.Errorf("rate limit %q: %w: rate 0; use Clear to remove a limit", dev, ErrInvalid)
	}
	l, err := r.nl.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("rate limit %q: %w: %w; give an existing device", dev, ErrUnknownDevice, err)
	}
	// The bucket holds at least one 64 KiB GSO packet and 10 ms at rate,
	// and the queue another 100 ms: enough to keep TCP busy at the cap
	// without letting a burst exceed it noticeably.
	burst := max(bytesPerSec/100, 128<<10)
	limit := min(burst+bytesPerSec/10, math.MaxUint32)
	q := &netlink.Tbf{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: rootHandle, Parent: netlink.HANDLE_ROOT},
		Rate:       bytesPerSec, Buffer: uint32(min(burst, math.MaxUint32)), Limit: uint32(limit),
	}
	if err := r.nl.QdiscReplace(q); err != nil {
		return fmt.Errorf("rate limit %q to %d B/s: tbf qdisc: %w", dev, bytesPerSec, err)
	}
	r.log.Info("rate limit set", "device", dev, "bytes_per_sec", bytesPerSec)
	return nil
}

// Get returns dev's current limit, or false if it has none set by Set.
func (r *RateLimiter) Get(ctx context.Context, dev string) (uint64, bool, error) {
	if err := ctx.Err(); err != nil {
		return 0, false, fmt.Errorf("rate limit of %q: %w", dev, err)
	}
	q, err := r.ours(dev)
	if err != nil || q == nil {
		return 0, false, err
	}
	return q.Rate, true, nil
}

// Clear removes dev's limit; it is a no-op when there is none.
func (r *RateLimiter) Clear(ctx context.Context, dev string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("clear rate limit of %q: %w", dev, err)
	}
	q, err := r.ours(dev)
	if err != nil || q == nil {
		return err
	}
	if err := r.nl.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("clear rate limit of %q: %w", dev, err)
	}
	r.log.Info("rate limit cleared", "device", dev)
	return nil
}

func (r *RateLimiter) ours(dev string) (*netlink.Tbf, error) {
	l, err := r.nl.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("rate limit of %q: %w: %w; give an existing device", dev, ErrUnknownDevice, err)
	}
	qs, err := r.nl.QdiscList(l)
	if err != nil {
		return nil, fmt.Errorf("rate limit of %q: list qdiscs: %w", dev, err)
	}
	for _, q := range qs {
		if t, ok := q.(*netlink.Tbf); ok && t.Parent == netlink.HANDLE_ROOT && t.Handle == rootHandle {
			return t, nil
		}
	}
	return nil, nil
}
