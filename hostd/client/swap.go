package client

import (
	"context"
	"net/http"

	"hostd/hostd/api"
	"hostd/hostd/swap"
	"hostd/hostd/vm"
	"hostd/xen"
)

// PutSwap gives a running VM a cooperative swap device.
func (c *Client) PutSwap(ctx context.Context, name string, r swap.Request) (swap.Status, error) {
	var s swap.Status
	return s, c.Do(ctx, http.MethodPut, vmPath(name, "/swap"), r, &s)
}

// Swap reports a VM's swap device, its stats and overload state.
func (c *Client) Swap(ctx context.Context, name string) (swap.Status, error) {
	var s swap.Status
	return s, c.Do(ctx, http.MethodGet, vmPath(name, "/swap"), nil, &s)
}

// ListSwap reports every swap device.
func (c *Client) ListSwap(ctx context.Context) ([]swap.Status, error) {
	var s []swap.Status
	return s, c.Do(ctx, http.MethodGet, "/v1/swap", nil, &s)
}

// DeleteSwap unplugs and removes a VM's swap device.
func (c *Client) DeleteSwap(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, vmPath(name, "/swap"), nil, nil)
}

// SetMemory sets a running VM's balloon target.
func (c *Client) SetMemory(ctx context.Context, name string, targetMiB uint64) (xen.DomainStats, error) {
	var s xen.DomainStats
	return s, c.Do(ctx, http.MethodPut, vmPath(name, "/memory"), vm.MemoryRequest{TargetMiB: targetMiB}, &s)
}

// Repo reports the repo role's repository.
func (c *Client) Repo(ctx context.Context) (api.RepoStatus, error) {
	var s api.RepoStatus
	return s, c.Do(ctx, http.MethodGet, "/v1/repo", nil, &s)
}
