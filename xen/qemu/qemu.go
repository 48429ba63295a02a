package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"time"

	"hostd/xen"
)

// Names under which the state file descriptors are handed to QEMU (getfd).
// A later getfd of the same name replaces an earlier one, so fixed names do
// not leak descriptors across attempts.
const (
	saveFDName = "hostd-save"
	loadFDName = "hostd-load"
)

// Poll intervals while a migration runs: short at first, since a device
// state save or load usually completes within tens of milliseconds, then
// backing off.
const (
	pollFirst = 2 * time.Millisecond
	pollMax   = 50 * time.Millisecond
)

// Client runs typed QMP commands through a xen.Monitor. Safe for
// concurrent use on different domains; one migration per domain at a time.
type Client struct {
	mon xen.Monitor
}

// New returns a client on mon (a driver's Monitor()).
func New(mon xen.Monitor) *Client { return &Client{mon: mon} }

// MigrationInfo is the part of query-migrate hostd uses.
type MigrationInfo struct {
	// Status: none, setup, active, device, completed, failed, cancelling,
	// cancelled, ...
	Status string `json:"status"`
	// TotalTimeMS is the migration's duration, once completed (source).
	TotalTimeMS uint64 `json:"total-time,omitempty"`
	// DowntimeMS is how long the guest was stopped (source, completed).
	DowntimeMS uint64        `json:"downtime,omitempty"`
	RAM        *MigrationRAM `json:"ram,omitempty"`
	ErrorDesc  string        `json:"error-desc,omitempty"`
}

// MigrationRAM counts RAM migrated; with x-ignore-shared only the blocks
// that are not shared (firmware, ROMs) are sent.
type MigrationRAM struct {
	Transferred uint64 `json:"transferred"`
	Remaining   uint64 `json:"remaining"`
	Total       uint64 `json:"total"`
	Normal      uint64 `json:"normal"`
}

// Status is query-status's answer.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"` // QEMU's run state: running, paused, inmigrate, postmigrate, ...
}

// SetMigrationCapabilities sets migration capabilities, e.g.
// {"x-ignore-shared": true}. The saving and the loading QEMU must agree.
func (c *Client) SetMigrationCapabilities(ctx context.Context, domain string, caps map[string]bool) error {
	if len(caps) == 0 {
		return fmt.Errorf("set migration capabilities of %q: none given", domain)
	}
	type capability struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	names := make([]string, 0, len(caps))
	for k := range caps {
		names = append(names, k)
	}
	sort.Strings(names) // stable commands, stable logs
	list := make([]capability, 0, len(names))
	for _, k := range names {
		list = append(list, capability{Capability: k, State: caps[k]})
	}
	if _, err := c.mon.Command(ctx, domain, "migrate-set-capabilities", map[string]any{"capabilities": list}); err != nil {
		return fmt.Errorf("set migration capabilities %v of %q: %w", names, domain, err)
	}
	return nil
}

// MigrationCapabilities returns the domain's migration capabilities.
func (c *Client) MigrationCapabilities(ctx context.Context, domain string) (map[string]bool, error) {
	raw, err := c.mon.Command(ctx, domain, "query-migrate-capabilities", nil)
	if err != nil {
		return nil, fmt.Errorf("query migration capabilities of %q: %w", domain, err)
	}
	var list []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("query migration capabilities of %q: decode %s: %w", domain, raw, err)
	}
	out := make(map[string]bool, len(list))
	for _, e := range list {
		out[e.Capability] = e.State
	}
	return out, nil
}

// QueryMigrate returns the state of the domain's current or last migration.
func (c *Client) QueryMigrate(ctx context.Context, domain string) (MigrationInfo, error) {
	var mi MigrationInfo
	raw, err := c.mon.Command(ctx, domain, "query-migrate", nil)
	if err != nil {
		return mi, fmt.Errorf("query migration of %q: %w", domain, err)
	}
	if err := json.Unmarshal(raw, &mi); err != nil {
		return mi, fmt.Errorf("query migration of %q: decode %s: %w", domain, raw, err)
	}
	if mi.Status == "" {
		mi.Status = "none" // QEMU omits it before any migration
	}
	return mi, nil
}

// QueryStatus returns QEMU's run state.
func (c *Client) QueryStatus(ctx context.Context, domain string) (Status, error) {
	var st Status
	raw, err := c.mon.Command(ctx, domain, "query-status", nil)
	if err != nil {
		return st, fmt.Errorf("query status of %q: %w", domain, err)
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return st, fmt.Errorf("query status of %q: decode %s: %w", domain, raw, err)
	}
	return st, nil
}

// SaveDeviceState writes the paused domain's migration stream to w and
// waits until QEMU has written all of it. With x-ignore-shared set (by the
// caller) and RAM in a shared file, that is the device state only. w stays
// the caller's: sync and close it. A running domain would be live-migrated
// and stopped at the end; suspend it first.
//
// On ctx's end the migration is cancelled. The domain stays paused either
// way; it can be resumed or destroyed.
func (c *Client) SaveDeviceState(ctx context.Context, domain string, w *os.File) (MigrationInfo, error) {
	op := fmt.Sprintf("save device state of %q", domain)
	if w == nil {
		return MigrationInfo{}, fmt.Errorf("%s: no file given", op)
	}
	if _, err := c.mon.CommandWithFiles(ctx, domain, "getfd", map[string]string{"fdname": saveFDName}, []*os.File{w}); err != nil {
		return MigrationInfo{}, fmt.Errorf("%s: pass the file to QEMU: %w", op, err)
	}
	if _, err := c.mon.Command(ctx, domain, "migrate", map[string]any{"uri": "fd:" + saveFDName}); err != nil {
		c.closeFD(domain, saveFDName)
		return MigrationInfo{}, fmt.Errorf("%s: %w", op, err)
	}
	mi, err := c.waitMigration(ctx, domain)
	if err != nil {
		if ctx.Err() != nil {
			c.cancel(domain)
		}
		return mi, fmt.Errorf("%s: %w", op, err)
	}
	return mi, nil
}

// LoadDeviceState feeds r, a stream SaveDeviceState wrote, to a domain
// started with Incoming (QEMU waiting in "inmigrate"), and waits until QEMU
// has loaded it and the domain can be resumed. The same capabilities as on
// the saving side must be set first (x-ignore-shared). r stays the caller's.
func (c *Client) LoadDeviceState(ctx context.Context, domain string, r *os.File) error {
	op := fmt.Sprintf("load device state into %q", domain)
	if r == nil {
		return fmt.Errorf("%s: no file given", op)
	}
	st, err := c.QueryStatus(ctx, domain)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if st.Status != "inmigrate" {
		return fmt.Errorf("%s: %w: QEMU is %q, not waiting for an incoming migration; define the domain with Incoming and start it",
			op, xen.ErrState, st.Status)
	}
	if _, err := c.mon.CommandWithFiles(ctx, domain, "getfd", map[string]string{"fdname": loadFDName}, []*os.File{r}); err != nil {
		return fmt.Errorf("%s: pass the file to QEMU: %w", op, err)
	}
	if _, err := c.mon.Command(ctx, domain, "migrate-incoming", map[string]any{"uri": "fd:" + loadFDName}); err != nil {
		c.closeFD(domain, loadFDName)
		return fmt.Errorf("%s: %w", op, err)
	}
	if _, err := c.waitMigration(ctx, domain); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	// query-migrate reports completed just before QEMU leaves inmigrate;
	// resuming in between would be refused.
	for delay := pollFirst; ; delay = min(2*delay, pollMax) {
		st, err := c.QueryStatus(ctx, domain)
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		if st.Status != "inmigrate" {
			return nil
		}
		if err := sleep(ctx, delay); err != nil {
			return fmt.Errorf("%s: waiting to leave inmigrate: %w", op, err)
		}
	}
}

// waitMigration polls query-migrate until the migration has completed or
// failed, or ctx ends.
func (c *Client) waitMigration(ctx context.Context, domain string) (MigrationInfo, error) {
	for delay := pollFirst; ; delay = min(2*delay, pollMax) {
		mi, err := c.QueryMigrate(ctx, domain)
		if err != nil {
			return mi, err
		}
		switch mi.Status {
		case "completed":
			return mi, nil
		case "failed", "cancelled":
			return mi, fmt.Errorf("migration %s: %s", mi.Status, mi.ErrorDesc)
		}
		if err := sleep(ctx, delay); err != nil {
			return mi, fmt.Errorf("migration still %s: %w", mi.Status, err)
		}
	}
}

// cancel and closeFD clean up after a failure; their own errors add
// nothing the caller can act on, and ctx may be over, so they get a short
// bound of their own.
func (c *Client) cancel(domain string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = c.mon.Command(ctx, domain, "migrate_cancel", nil)
}

func (c *Client) closeFD(domain, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = c.mon.Command(ctx, domain, "closefd", map[string]string{"fdname": name})
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
