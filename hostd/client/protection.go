package client

import (
	"context"
	"net/http"
	"net/url"

	"hostd/hostd/jobs"
	"hostd/hostd/protect"
)

func vmPath(name, rest string) string { return "/v1/vms/" + url.PathEscape(name) + rest }

// Protect starts protection; the returned job is the first full copy.
func (c *Client) Protect(ctx context.Context, name string, r protect.Request) (jobs.Job, error) {
	var j jobs.Job
	return j, c.Do(ctx, http.MethodPut, vmPath(name, "/protection"), r, &j)
}

// Protection reports a VM's protection.
func (c *Client) Protection(ctx context.Context, name string) (protect.Status, error) {
	var s protect.Status
	return s, c.Do(ctx, http.MethodGet, vmPath(name, "/protection"), nil, &s)
}

// ListProtection reports every protected VM.
func (c *Client) ListProtection(ctx context.Context) ([]protect.Status, error) {
	var s []protect.Status
	return s, c.Do(ctx, http.MethodGet, "/v1/protection", nil, &s)
}

// Unprotect stops protection.
func (c *Client) Unprotect(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, vmPath(name, "/protection"), nil, nil)
}

// Evacuate starts an evacuation job.
func (c *Client) Evacuate(ctx context.Context, name string, r protect.EvacuateRequest) (jobs.Job, error) {
	var j jobs.Job
	return j, c.Do(ctx, http.MethodPost, vmPath(name, "/evacuate"), r, &j)
}

// Epoch takes a crash-consistent restore point now.
func (c *Client) Epoch(ctx context.Context, name string) (protect.Report, error) {
	var r protect.Report
	return r, c.Do(ctx, http.MethodPost, vmPath(name, "/epoch"), nil, &r)
}

// EvacuateHost evacuates every protected VM as one job.
func (c *Client) EvacuateHost(ctx context.Context, r protect.EvacuateRequest) (jobs.Job, error) {
	var j jobs.Job
	return j, c.Do(ctx, http.MethodPost, "/v1/host/evacuate", r, &j)
}

// Restore brings a VM back from a backup as a job.
func (c *Client) Restore(ctx context.Context, r protect.RestoreRequest) (jobs.Job, error) {
	var j jobs.Job
	return j, c.Do(ctx, http.MethodPost, "/v1/vms/restore", r, &j)
}
