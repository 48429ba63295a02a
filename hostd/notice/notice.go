package notice

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"sync"
	"time"
)

// Provider names the cloud a notice came from.
type Provider string

// The providers with a watcher.
const (
	EC2Provider   Provider = "ec2"
	GCEProvider   Provider = "gce"
	AzureProvider Provider = "azure"
)

// DefaultBaseURL is the link-local metadata address all three providers
// serve (GCE's metadata.google.internal resolves to it too; the IP needs no
// DNS, which may be what is failing when the machine is being taken away).
const DefaultBaseURL = "http://169.254.169.254"

// The providers' documented polling cadences and warnings.
const (
	// EC2Interval: AWS recommends checking for interruption notices every 5 s.
	EC2Interval = 5 * time.Second
	// GCEInterval is the plain-polling cadence; with long-polling the
	// watcher hears of a preemption as soon as the metadata changes.
	GCEInterval = 5 * time.Second
	// AzureInterval: Azure recommends polling Scheduled Events at least
	// every second for Preempt, whose warning is only 30 s.
	AzureInterval = time.Second

	// EC2Warning is how long before a spot interruption EC2 posts it.
	EC2Warning = 2 * time.Minute
	// GCEWarning is the time between the preempted flag turning TRUE and
	// the instance being stopped; GCE gives no deadline of its own.
	GCEWarning = 30 * time.Second
	// AzureWarning is the minimum warning of a Preempt event; used as the
	// deadline when a scheduled event carries no NotBefore.
	AzureWarning = 30 * time.Second
)

// MaxBody caps a metadata response: the real ones are a few hundred bytes,
// and a larger one is a broken or hostile server, not a notice.
const MaxBody = 64 << 10

// Notice is one warning that this machine will be taken away.
type Notice struct {
	Provider Provider `json:"provider"`
	// ID identifies the notice at its provider: the same notice seen in
	// two polls has the same ID (Azure's EventId; EC2's action and time;
	// "preempted" on GCE, which has one preemption per instance life).
	ID string `json:"id"`
	// Action is what the provider will do: terminate, stop or hibernate
	// (EC2), preempt (GCE, Azure) or terminate (Azure).
	Action string `json:"action"`
	// Deadline is when the machine may go away; everything must be
	// committed before it.
	Deadline time.Time `json:"deadline"`
	// Received is when the watcher saw the notice.
	Received time.Time `json:"received"`
	// Detail is the provider's own words, for humans.
	Detail string `json:"detail,omitempty"`
}

// Config mirrors the [notice] section of hostd.toml. The zero value enables
// nothing.
type Config struct {
	EC2   ProviderConfig `toml:"ec2"`
	GCE   ProviderConfig `toml:"gce"`
	Azure AzureConfig    `toml:"azure"`
}

// ProviderConfig is one provider's watcher.
type ProviderConfig struct {
	Enabled bool `toml:"enabled"`
	// BaseURL of the metadata server; empty means DefaultBaseURL.
	BaseURL string `toml:"base_url"`
	// Interval between polls; zero means the provider's documented cadence.
	Interval time.Duration `toml:"interval"`
}

// AzureConfig adds Azure's acknowledgement to ProviderConfig.
type AzureConfig struct {
	ProviderConfig
	// Acknowledge approves the Preempt event (POST StartRequests) once the
	// notice has been handled, which lets Azure evict earlier than
	// NotBefore. Off by default: hostd wants the whole warning.
	Acknowledge bool `toml:"acknowledge"`
}

// DefaultConfig is Config with every default written out, as hostd.toml
// shows it: all watchers off.
func DefaultConfig() Config {
	return Config{
		EC2:   ProviderConfig{BaseURL: DefaultBaseURL, Interval: EC2Interval},
		GCE:   ProviderConfig{BaseURL: DefaultBaseURL, Interval: GCEInterval},
		Azure: AzureConfig{ProviderConfig: ProviderConfig{BaseURL: DefaultBaseURL, Interval: AzureInterval}},
	}
}

// Validate reports the first setting that cannot work, named by its TOML key.
func (c Config) Validate() error {
	if err := c.EC2.validate("notice.ec2", EC2Warning); err != nil {
		return err
	}
	if err := c.GCE.validate("notice.gce", GCEWarning); err != nil {
		return err
	}
	return c.Azure.validate("notice.azure", AzureWarning)
}

func (p ProviderConfig) validate(key string, warning time.Duration) error {
	if _, err := baseURL(p.BaseURL); err != nil {
		return fmt.Errorf("%s.base_url: %w", key, err)
	}
	return checkInterval(key+".interval", p.Interval, warning)
}

// minInterval keeps a misconfigured watcher from hammering the metadata
// server; tests poll at 20 ms.
const minInterval = 10 * time.Millisecond

func checkInterval(key string, d, warning time.Duration) error {
	switch {
	case d == 0:
		return nil
	case d < minInterval:
		return fmt.Errorf("%s: %v is below the minimum of %v (0 means the provider's cadence)", key, d, minInterval)
	case d >= warning:
		return fmt.Errorf("%s: %v is not shorter than the provider's %v warning, so a notice could be seen too late (0 means the provider's cadence)", key, d, warning)
	}
	return nil
}

// baseURL checks a configured base URL and returns it without a trailing
// slash, so paths can be appended; empty means DefaultBaseURL.
func baseURL(s string) (string, error) {
	if s == "" {
		return DefaultBaseURL, nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", fmt.Errorf("parse %q: %w", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("%q is not an http:// or https:// URL with a host (the default is %s)", s, DefaultBaseURL)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("%q: a base URL takes no query, fragment or user", s)
	}
	for len(s) > 0 && s[len(s)-1] == '/' {
		s = s[:len(s)-1]
	}
	return s, nil
}

// Start runs the watchers cfg enables, each in its own goroutine, until ctx
// ends; it returns at once if none is enabled, and without starting anything
// if cfg is invalid. onNotice is called once per distinct notice, never
// concurrently; it should hand the notice off quickly, since the watcher
// that found it waits for it (with Azure's acknowledgement on, that wait is
// the point: the event is acknowledged when onNotice returns). Start
// returns nil when ctx ends.
func Start(ctx context.Context, cfg Config, log *slog.Logger, onNotice func(Notice)) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("start termination notice watchers: %w", err)
	}
	var runs []func(context.Context, func(Notice)) error
	if p := cfg.EC2; p.Enabled {
		w := &EC2{Endpoint: Endpoint{BaseURL: p.BaseURL, Interval: p.Interval, Log: log}}
		runs = append(runs, w.Run)
	}
	if p := cfg.GCE; p.Enabled {
		w := &GCE{Endpoint: Endpoint{BaseURL: p.BaseURL, Interval: p.Interval, Log: log}}
		runs = append(runs, w.Run)
	}
	if p := cfg.Azure; p.Enabled {
		w := &Azure{Endpoint: Endpoint{BaseURL: p.BaseURL, Interval: p.Interval, Log: log}, Acknowledge: p.Acknowledge}
		runs = append(runs, w.Run)
	}
	if len(runs) == 0 {
		return nil
	}
	var mu sync.Mutex
	deliver := func(n Notice) {
		mu.Lock()
		defer mu.Unlock()
		onNotice(n)
	}
	errs := make([]error, len(runs))
	var wg sync.WaitGroup
	for i, run := range runs {
		wg.Go(func() { errs[i] = run(ctx, deliver) })
	}
	wg.Wait()
	return errors.Join(errs...)
}
