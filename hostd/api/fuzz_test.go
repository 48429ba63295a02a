package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"hostd/hostd/api"
	"hostd/hostd/vm"
)

// FuzzAPIRequests sends arbitrary bodies and {name}/{id} values to every
// route of a hostd whose hypervisor is a fake and whose memory plane and
// swap have no TLS configured (so no request can reach a peer: restores,
// protections and swap devices stop at "not configured" once valid). What
// must hold for any input: no 500, every error a JSON body with a code
// openapi.yaml documents, and nothing outside the state and run
// directories touched. CI runs it for a bounded time (.ci/test.sh).
func FuzzAPIRequests(f *testing.F) {
	root := f.TempDir()
	victim := filepath.Join(root, "victim")
	if err := os.MkdirAll(victim, 0o755); err != nil {
		f.Fatal(err)
	}
	e := startWith(f, envOpts{full: true, dir: root})
	ctx := context.Background()
	if _, err := e.c.CreateVM(ctx, vm.Request{Name: "web"}); err != nil {
		f.Fatal(err)
	}
	codes := errorCodes(f)
	routes := slices.Clone(e.srv.Routes)
	slices.Sort(routes)
	skip := []string{e.cfg.StateDir, e.cfg.RunDir}
	before := tree(f, root, skip...)

	for i, c := range malformedRequests() {
		f.Add(uint8(i), "web", []byte(c.body))
	}
	f.Add(uint8(0), "../../victim", []byte(`{"name":"../../victim","backup":"127.0.0.1:1","id":"x"}`))
	f.Fuzz(func(t *testing.T, op uint8, name string, body []byte) {
		method, pattern, _ := strings.Cut(routes[int(op)%len(routes)], " ")
		if pattern == "/v1/events" {
			return // a stream: it answers 200 and stays open
		}
		esc := url.PathEscape(name)
		path := strings.NewReplacer("{name}", esc, "{id}", esc).Replace(pattern)
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		resp := rawRequest(t, rctx, e.sock, method, path, bytes.NewReader(body))
		if resp.status >= 400 {
			var ae api.Error
			if err := json.Unmarshal(resp.body, &ae); err != nil || ae.Code == "" {
				t.Fatalf("%s %s: HTTP %d, not a JSON error: %q", method, path, resp.status, resp.body)
			}
			if !slices.Contains(codes, ae.Code) {
				t.Fatalf("%s %s: undocumented code %q", method, path, ae.Code)
			}
			if resp.status == 500 {
				t.Fatalf("%s %s %q: HTTP 500: %s", method, path, body, resp.body)
			}
		}
		if after := tree(t, root, skip...); !slices.Equal(before, after) {
			t.Fatalf("%s %s %q touched files outside the state directory:\nbefore %v\nafter  %v", method, path, body, before, after)
		}
	})
}
