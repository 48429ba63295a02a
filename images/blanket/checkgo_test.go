package blanket

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// goModVersion is go.mod's go line.
func goModVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	return string(m[1])
}

// fakeGo writes an executable stand-in for go that runs script.
func fakeGo(t *testing.T, script string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "go")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// check-go.sh passes with the toolchain the tests run on, and refuses a
// missing Go, an older one and one that cannot switch to go.mod's version,
// each with a message that names the required version and how to install it.
func TestCheckGo(t *testing.T) {
	need := goModVersion(t)
	for _, c := range []struct {
		name, goBin string
		ok          bool
		says        []string
	}{
		{"this toolchain", "go", true, nil},
		{"missing", "no-such-go", false, []string{"no Go toolchain found", "Go " + need, "/usr/local/go"}},
		{"older", fakeGo(t, "echo go1.19.8"), false, []string{"is Go 1.19.8", "needs Go " + need, "/usr/local/go"}},
		{"cannot switch", fakeGo(t, "echo 'go: downloading go"+need+": toolchain not available' >&2; exit 1"), false,
			[]string{"cannot provide Go " + need, "toolchain not available", "/usr/local/go"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command("bash", "check-go.sh")
			cmd.Env = append(os.Environ(), "GO="+c.goBin)
			out, err := cmd.CombinedOutput()
			if c.ok != (err == nil) {
				t.Fatalf("check-go.sh with GO=%s: err %v, want ok=%v\n%s", c.goBin, err, c.ok, out)
			}
			for _, s := range c.says {
				if !strings.Contains(string(out), s) {
					t.Errorf("message lacks %q:\n%s", s, out)
				}
			}
		})
	}
}
