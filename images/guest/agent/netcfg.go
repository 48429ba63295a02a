package main

import (
	"context"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
)

// configureEth0 gives eth0 the address from hostd.ip and brings it up. The
// NIC appears when virtio_net probes, which /init has already triggered,
// but the wait is bounded in case the VM has no NIC at all.
func configureEth0(ctx context.Context, cidr string) error {
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return fmt.Errorf("configure eth0: hostd.ip=%q: %w", cidr, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var link netlink.Link
	for {
		link, err = netlink.LinkByName("eth0")
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("configure eth0: no such link: %w", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("configure eth0: add %s: %w", cidr, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("configure eth0: set up: %w", err)
	}
	return nil
}
