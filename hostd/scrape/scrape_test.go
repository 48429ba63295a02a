package scrape

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The listener serves the registry's metrics to GET and nothing else.
func TestOnlyGetMetricsIsServed(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "hostd_test_total", Help: "A test counter."})
	reg.MustRegister(c)
	c.Add(3)
	s, err := Listen("127.0.0.1:0", reg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	hc := &http.Client{Timeout: 10 * time.Second}
	base := "http://" + s.Addr()

	resp, err := hc.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "hostd_test_total 3") {
		t.Fatalf("GET /metrics: %d %s", resp.StatusCode, body)
	}
	for _, c := range []struct {
		method, path string
		want         int
	}{
		{"POST", "/metrics", 405}, {"DELETE", "/metrics", 405},
		{"GET", "/v1/vms", 404}, {"DELETE", "/v1/vms/web", 404}, {"GET", "/", 404},
	} {
		req, _ := http.NewRequest(c.method, base+c.path, nil)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.want)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the listener did not stop with its context")
	}
}
