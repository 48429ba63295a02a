package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"hostd/hostd/api"
	"hostd/hostd/vm"
)

// badRequest is one request that cannot succeed: it must be answered with
// a 4xx and a JSON error before anything exists.
type badRequest struct {
	method, pattern string // the operation in openapi.yaml
	path, body      string // what is sent
}

// badNames are {name}s that must never become a path, a domain or a job:
// escapes of the state directory (raw and URL-escaped), a NUL, a name too
// long for a socket path, and names outside the VM name rule.
var badNames = []string{
	"..%2F..%2Fvictim", "..%2Fvictim", "a%2Fb", "a%00b", strings.Repeat("a", 300),
	"UPPER", "-lead", "trail-", "dot.ted", "slot.256m.1c.ab", "%2E%2E",
}

// The POST, PUT and DELETE operations with a {name}, with a body that would
// be acceptable for a good name: only the name is wrong.
var namedOps = []struct{ method, pattern, body string }{
	{"DELETE", "/v1/vms/{name}", ``},
	{"POST", "/v1/vms/{name}/start", ``},
	{"POST", "/v1/vms/{name}/shutdown", `{"timeout_s": 1}`},
	{"POST", "/v1/vms/{name}/destroy", ``},
	{"PUT", "/v1/vms/{name}/protection", `{"backup": "127.0.0.1:7443"}`},
	{"DELETE", "/v1/vms/{name}/protection", ``},
	{"POST", "/v1/vms/{name}/evacuate", `{}`},
	{"POST", "/v1/vms/{name}/epoch", ``},
	{"PUT", "/v1/vms/{name}/memory", `{"target_mib": 64}`},
	{"PUT", "/v1/vms/{name}/swap", `{"size_mib": 4, "repos": ["127.0.0.1:7011"]}`},
	{"DELETE", "/v1/vms/{name}/swap", ``},
}

func malformedRequests() []badRequest {
	var out []badRequest
	for _, op := range namedOps {
		for _, n := range badNames {
			out = append(out, badRequest{op.method, op.pattern, strings.Replace(op.pattern, "{name}", n, 1), op.body})
		}
	}
	long := strings.Repeat("x", 300)
	add := func(method, pattern, path string, bodies ...string) {
		for _, b := range bodies {
			out = append(out, badRequest{method, pattern, path, b})
		}
	}
	add("POST", "/v1/vms", "/v1/vms",
		`{"name": "../../victim"}`, `{"name": "..%2F..%2Fvictim"}`, `{"name": "a\u0000b"}`, `{"name": "`+long+`"}`,
		`{"name": "web"}`, `{"name": "a", "memory_mib": -1}`, `{"name": "a", "vcpus": -1}`, `{"name": "a", "start": "yes"}`,
		`{"name": "a"`, `[]`, `null`, `{"name": "a", "served_memory": true, "extra": 1}`)
	const restore = "/v1/vms/restore"
	add("POST", restore, restore,
		`{}`, `{"backup": "127.0.0.1:7443"}`, `{"id": "db"}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "name": "../../victim"}`,
		`{"backup": "127.0.0.1:7443", "id": "../../victim"}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "name": "a\u0000b"}`,
		`{"backup": "127.0.0.1:7443", "id": "`+long+`"}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "name": "`+long+`"}`,
		`{"backup": "127.0.0.1:7443", "id": "Db_1"}`,
		`{"backup": "127.0.0.1:7443", "id": ".hidden", "name": "db"}`,
		`{"backup": "127.0.0.1:99999", "id": "db"}`, `{"backup": "127.0.0.1", "id": "db"}`, `{"backup": ":7443", "id": "db"}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "mode": "eager"}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "slot": "hot"}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "prefetch_rate": -1}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "protect": {"bound": "-5s"}}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "protect": {"bound": "0s"}}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "protect": {"backup": "127.0.0.1:0"}}`,
		`{"backup": "127.0.0.1:7443", "id": "db", "protect": {"id": "../x"}}`,
		`{"backup": "127.0.0.1:7443", "id": "web"}`, // restoring over an existing VM: 409
		`{"backup": "127.0.0.1:7443", "id": "db", "epoch": -1}`)
	const prot = "/v1/vms/{name}/protection"
	add("PUT", prot, "/v1/vms/web/protection",
		`{}`, `{"backup": ""}`, `{"backup": "nohost"}`, `{"backup": "127.0.0.1:99999"}`, `{"backup": ":7443"}`,
		`{"backup": "127.0.0.1:7443", "bound": "0s"}`, `{"backup": "127.0.0.1:7443", "bound": "-1s"}`,
		`{"backup": "127.0.0.1:7443", "bound": "forever"}`, `{"backup": "127.0.0.1:7443", "bound": "9999h"}`,
		`{"backup": "127.0.0.1:7443", "epoch_interval": "10ms"}`, `{"backup": "127.0.0.1:7443", "epoch_interval": "-1s"}`,
		`{"backup": "127.0.0.1:7443", "weight": -1}`, `{"backup": "127.0.0.1:7443", "id": "../x"}`,
		`{"backup": "127.0.0.1:7443", "id": ".hidden"}`, `{"backup": "127.0.0.1:7443", "bakup": "x"}`,
		`{"backup": "127.0.0.1:7443"}`) // web's memory is not served: 400
	add("DELETE", prot, "/v1/vms/web/protection", ``) // not protected: 409
	add("POST", "/v1/vms/{name}/evacuate", "/v1/vms/web/evacuate",
		`{"after": "explode"}`, `{"deadline": "2000-01-01T00:00:00Z"}`, `{"deadline": "2999-01-01T00:00:00Z"}`,
		`{"deadline": "yesterday"}`, `{}`)
	add("POST", "/v1/vms/{name}/epoch", "/v1/vms/web/epoch", ``, `{"x": 1}`)
	add("POST", "/v1/host/evacuate", "/v1/host/evacuate", `{"after": "x"}`, `{"deadline": "2000-01-01T00:00:00Z"}`, `{}`)
	add("PUT", "/v1/vms/{name}/memory", "/v1/vms/web/memory",
		`{"target_mib": 0}`, `{"target_mib": 99999999}`, `{}`, `{"target_mib": "lots"}`)
	add("PUT", "/v1/vms/{name}/memory", "/v1/vms/ghost/memory", `{"target_mib": 64}`)
	add("PUT", "/v1/vms/{name}/swap", "/v1/vms/web/swap",
		`{"size_mib": 0, "repos": ["127.0.0.1:7011"]}`, `{"size_mib": 4, "repos": []}`, `{"size_mib": 4, "repos": ["127.0.0.1:99999"]}`,
		`{"size_mib": 4, "repos": ["nohost"]}`, `{"size_mib": 4, "repos": ["127.0.0.1:1", "127.0.0.1:1"]}`,
		`{"size_mib": 99999999, "repos": ["127.0.0.1:7011"]}`)
	add("DELETE", "/v1/vms/{name}/swap", "/v1/vms/web/swap", ``) // none: 404
	add("DELETE", "/v1/vms/{name}", "/v1/vms/ghost", ``)
	add("POST", "/v1/vms/{name}/start", "/v1/vms/web/start", ``) // running: 409
	add("POST", "/v1/vms/{name}/shutdown", "/v1/vms/web/shutdown", `{"timeout_s": -1}`, `{"timeout_s": 99999}`)
	add("POST", "/v1/vms/{name}/destroy", "/v1/vms/web/destroy", `{"force": true}`)
	ep := func(host, vm string, nic int) string {
		return fmt.Sprintf(`{"host": %q, "vm": %q, "nic": %d}`, host, vm, nic)
	}
	conn := func(id int, a, b string) string { return fmt.Sprintf(`{"id": %d, "a": %s, "b": %s}`, id, a, b) }
	good := ep("127.0.0.2", "web", 0)
	add("POST", "/v1/connectors", "/v1/connectors",
		conn(0, good, good), conn(1<<24, good, good), conn(7, ep("nohost", "web", 0), good),
		conn(7, ep("127.0.0.2", "../x", 0), good), conn(7, good, ep("127.0.0.3", "web", -1)),
		conn(7, good, ep("127.0.0.3", "web", 1000)), `{"id": "seven"}`)
	add("PUT", "/v1/connectors/{id}", "/v1/connectors/0", conn(0, good, good))
	add("PUT", "/v1/connectors/{id}", "/v1/connectors/abc", conn(7, good, good))
	add("PUT", "/v1/connectors/{id}", "/v1/connectors/16777216", conn(7, good, good))
	add("PUT", "/v1/connectors/{id}", "/v1/connectors/7", conn(8, good, good))
	add("DELETE", "/v1/connectors/{id}", "/v1/connectors/0", ``)
	add("DELETE", "/v1/connectors/{id}", "/v1/connectors/..%2F..", ``)
	// Paths that are not clean never reach a route.
	add("POST", "/v1/vms/{name}/start", "/v1/vms/../start", ``)
	add("DELETE", "/v1/vms/{name}", "/v1/vms/web/..", ``)
	return out
}

// tree lists the files and directories under root, but for those in skip.
func tree(t testing.TB, root string, skip ...string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if slices.Contains(skip, p) {
			return filepath.SkipDir
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// errorCodes are the codes openapi.yaml documents.
func errorCodes(t testing.TB) []string {
	t.Helper()
	var doc struct {
		Components struct {
			Schemas map[string]struct {
				Properties map[string]struct {
					Enum []string `yaml:"enum"`
				} `yaml:"properties"`
			} `yaml:"schemas"`
		} `yaml:"components"`
	}
	if err := yaml.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatal(err)
	}
	codes := doc.Components.Schemas["Error"].Properties["code"].Enum
	if len(codes) == 0 {
		t.Fatal("openapi.yaml's Error schema lists no codes")
	}
	return codes
}

// Every malformed request over every POST, PUT and DELETE operation is
// refused with a 4xx and a documented JSON error code before anything
// exists: no job, no VM, no file or directory appears or disappears outside
// the scratch state directory (a victim directory beside it is what a
// "../" name would reach), and hostd answers afterwards.
func TestMalformedRequestsAreRefusedBeforeAnythingExists(t *testing.T) {
	root := t.TempDir()
	victim := filepath.Join(root, "victim")
	if err := os.MkdirAll(filepath.Join(victim, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(victim, "data", "keep"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	e := startWith(t, envOpts{full: true, tls: true, dir: root})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := e.c.CreateVM(ctx, vm.Request{Name: "web"}); err != nil {
		t.Fatal(err)
	}
	skip := []string{e.cfg.StateDir, e.cfg.RunDir}
	before := tree(t, root, skip...)
	vmsBefore, err := e.c.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defines := e.fake.Calls["define"]
	codes := errorCodes(t)

	cases := malformedRequests()
	if len(cases) < 100 {
		t.Fatalf("only %d malformed requests", len(cases))
	}
	covered := map[string]bool{}
	seen := map[string]int{} // codes answered, for the log
	for _, c := range cases {
		covered[c.method+" "+c.pattern] = true
		var body io.Reader
		if c.body != "" {
			body = strings.NewReader(c.body)
		}
		resp := rawRequest(t, ctx, e.sock, c.method, c.path, body)
		if resp.status < 400 || resp.status >= 500 {
			t.Errorf("%s %s %s: HTTP %d %s, want a 4xx", c.method, c.path, c.body, resp.status, resp.body)
			continue
		}
		var ae api.Error
		if err := json.Unmarshal(resp.body, &ae); err != nil || ae.Code == "" || ae.Message == "" {
			t.Errorf("%s %s %s: HTTP %d, not a JSON error: %s", c.method, c.path, c.body, resp.status, resp.body)
			continue
		}
		seen[fmt.Sprintf("%d %s", resp.status, ae.Code)]++
		if !slices.Contains(codes, ae.Code) {
			t.Errorf("%s %s: code %q is not in openapi.yaml", c.method, c.path, ae.Code)
		}
	}
	t.Logf("%d malformed requests answered: %v", len(cases), seen)
	// Every POST, PUT and DELETE operation of the contract has cases.
	for _, op := range mutatingOperations(t) {
		if !covered[op] {
			t.Errorf("no malformed request for %s", op)
		}
	}
	if after := tree(t, root, skip...); !slices.Equal(before, after) {
		t.Errorf("files outside the state directory changed:\nbefore %v\nafter  %v", before, after)
	}
	if b, err := os.ReadFile(filepath.Join(victim, "data", "keep")); err != nil || string(b) != "keep" {
		t.Errorf("the victim's file: %q %v", b, err)
	}
	js, err := e.c.Jobs(ctx)
	if err != nil || len(js) != 0 {
		t.Errorf("malformed requests made jobs: %+v %v", js, err)
	}
	vmsAfter, err := e.c.ListVMs(ctx)
	if err != nil || len(vmsAfter) != len(vmsBefore) || e.fake.Calls["define"] != defines {
		t.Errorf("malformed requests changed the VMs: %+v %v (%d defines, %d before)", vmsAfter, err, e.fake.Calls["define"], defines)
	}
	if _, err := e.c.Host(ctx); err != nil {
		t.Errorf("hostd does not answer after the malformed requests: %v", err)
	}
}

func mutatingOperations(t *testing.T) []string {
	t.Helper()
	var doc struct {
		Paths map[string]map[string]any `yaml:"paths"`
	}
	if err := yaml.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatal(err)
	}
	var out []string
	for p, ops := range doc.Paths {
		for m := range ops {
			if m == "post" || m == "put" || m == "delete" {
				out = append(out, strings.ToUpper(m)+" "+p)
			}
		}
	}
	slices.Sort(out)
	return out
}

type rawResponse struct {
	status int
	body   []byte
}

// rawRequest sends a request with its path exactly as given (escapes and
// all), which client.Do would not.
func rawRequest(t testing.TB, ctx context.Context, sock, method, path string, body io.Reader) rawResponse {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, "http://hostd/", body)
	if err != nil {
		t.Fatal(err)
	}
	req.URL.Opaque = path // sent verbatim: "%2F" stays escaped, ".." stays
	hc := unixHTTP(sock)
	defer hc.CloseIdleConnections()
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return rawResponse{resp.StatusCode, b}
}

// unixHTTP is an HTTP client for the unix socket at sock.
func unixHTTP(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}
