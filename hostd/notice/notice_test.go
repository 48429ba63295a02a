package notice

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
)

func TestDefaultConfigValid(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatal(err)
	}
	if err := (Config{}).Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"bad scheme", Config{EC2: ProviderConfig{BaseURL: "ftp://169.254.169.254"}}, "notice.ec2.base_url"},
		{"no host", Config{GCE: ProviderConfig{BaseURL: "http://"}}, "notice.gce.base_url"},
		{"query", Config{Azure: AzureConfig{ProviderConfig: ProviderConfig{BaseURL: "http://x/?a=b"}}}, "notice.azure.base_url"},
		{"interval too short", Config{EC2: ProviderConfig{Interval: time.Millisecond}}, "notice.ec2.interval"},
		{"interval past the warning", Config{GCE: ProviderConfig{Interval: time.Minute}}, "notice.gce.interval"},
		{"negative interval", Config{Azure: AzureConfig{ProviderConfig: ProviderConfig{Interval: -time.Second}}}, "notice.azure.interval"},
	} {
		err := tc.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one naming %s", tc.name, err, tc.want)
		}
	}
}

// The daemon's configuration can decode the [notice] section straight into
// Config.
func TestConfigTOML(t *testing.T) {
	var v struct {
		Notice Config `toml:"notice"`
	}
	md, err := toml.Decode(`
[notice.ec2]
enabled = true
interval = "2s"
[notice.azure]
enabled = true
base_url = "http://127.0.0.1:8080/"
acknowledge = true
`, &v)
	if err != nil {
		t.Fatal(err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		t.Fatalf("undecoded keys %v", und)
	}
	c := v.Notice
	if !c.EC2.Enabled || c.EC2.Interval != 2*time.Second || c.GCE.Enabled || !c.Azure.Enabled || !c.Azure.Acknowledge || c.Azure.BaseURL != "http://127.0.0.1:8080/" {
		t.Fatalf("decoded %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestStartNoneEnabled(t *testing.T) {
	done := make(chan error, 1)
	go func() { done <- Start(context.Background(), DefaultConfig(), nil, func(Notice) {}) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Start with nothing enabled did not return")
	}
}

func TestStartInvalid(t *testing.T) {
	cfg := Config{EC2: ProviderConfig{Enabled: true, BaseURL: "not a url"}}
	if err := Start(context.Background(), cfg, nil, func(Notice) {}); err == nil {
		t.Fatal("Start accepted an invalid base URL")
	}
}

// All three watchers through Start, against their fakes, each with a
// notice: three notices, one per provider.
func TestStartAll(t *testing.T) {
	ec2, gce, az := newFakeEC2(t), newFakeGCE(t), newFakeAzure(t, "vm0")
	ec2.setAction(`{"action":"terminate","time":"2030-01-01T00:02:00Z"}`)
	gce.set("TRUE")
	az.setDoc(`{"DocumentIncarnation":1,"Events":[{"EventId":"E","EventStatus":"Scheduled","EventType":"Preempt","Resources":["vm0"],"NotBefore":"Tue, 01 Jan 2030 00:00:30 GMT"}]}`)
	cfg := Config{
		EC2:   ProviderConfig{Enabled: true, BaseURL: ec2.srv.URL, Interval: testInterval},
		GCE:   ProviderConfig{Enabled: true, BaseURL: gce.srv.URL, Interval: testInterval},
		Azure: AzureConfig{ProviderConfig: ProviderConfig{Enabled: true, BaseURL: az.srv.URL, Interval: testInterval}},
	}
	log, _ := testLogger(t)
	c, _ := runWatcher(t, func(ctx context.Context, on func(Notice)) error { return Start(ctx, cfg, log, on) })
	waitFor(t, "three notices", func() bool { return len(c.get()) >= 3 })
	seen := map[Provider]int{}
	for _, n := range c.get() {
		seen[n.Provider]++
	}
	if seen[EC2Provider] != 1 || seen[GCEProvider] != 1 || seen[AzureProvider] != 1 {
		t.Fatalf("notices per provider %v, want one each", seen)
	}
}
