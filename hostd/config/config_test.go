package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The documented file must say exactly what Default() does.
func TestDocumentedFileMatchesDefaults(t *testing.T) {
	got, err := Load("hostd.toml", false)
	if err != nil {
		t.Fatal(err)
	}
	if want := Default(); !reflect.DeepEqual(got, want) {
		t.Fatalf("hostd.toml and Default() disagree:\nfile:    %+v\ndefault: %+v", got, want)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]string{
		"unknown keys":             "bogus = 1\n",
		"unknown role":             `roles = ["router"]`,
		"must be an absolute path": `state_dir = "relative"`,
		"is not one of auto":       "[hypervisor]\naccel = \"fast\"\n",
		"parse duration":           "[hypervisor]\nshutdown_timeout = \"soon\"\n",
		"must be positive":         "[hypervisor]\nshutdown_timeout = \"-1s\"\n",
		"log.level":                "[log]\nlevel = \"loud\"\n",
		"warm_slots[0].vcpus":      "[restore]\nwarm_slots = [{memory_mib = 256, count = 1}]\n",
		"warm_slots[1]: a second":  "[restore]\nwarm_slots = [{memory_mib = 256, vcpus = 1, count = 1}, {memory_mib = 256, vcpus = 1, count = 2}]\n",
		"is below the minimum":     "[restore]\nwarm_slots = [{memory_mib = 8, vcpus = 1, count = 1}]\n",
		"api.metrics_listen":       "[api]\nmetrics_listen = \"127.0.0.1:99999\"\n",
	}
	for want, body := range cases {
		p := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Load(p, false)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: error %v, want it to mention %q", body, err, want)
		}
	}
	if _, err := Load(filepath.Join(dir, "missing.toml"), false); err == nil {
		t.Error("a missing file must be an error unless allowed")
	}
	if c, err := Load(filepath.Join(dir, "missing.toml"), true); err != nil || c.API.Socket != Default().API.Socket {
		t.Errorf("allowed missing file: %v %+v", err, c)
	}
}
