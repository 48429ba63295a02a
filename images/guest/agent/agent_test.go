package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"hostd/images/guest/agentapi"
)

// These tests run the agent's request handling on the host: the same code
// that runs in the guest, minus the console and the virtio port.

func newTestAgent(t *testing.T) *agent {
	t.Helper()
	a := &agent{console: newConsole(io.Discard), kernel: kernelRelease(), workloads: map[string]*workload{}}
	t.Cleanup(func() {
		for _, w := range a.workloads {
			w.cancel()
			<-w.done
			w.release()
		}
		if a.echo != nil {
			a.echo.close()
		}
	})
	return a
}

func call(t *testing.T, a *agent, line string, result any) agentapi.Response {
	t.Helper()
	resp := a.handle([]byte(line))
	if resp.OK && result != nil {
		if err := json.Unmarshal(resp.Result, result); err != nil {
			t.Fatalf("%s: decode result: %v", line, err)
		}
	}
	return resp
}

func TestHandleBadRequests(t *testing.T) {
	a := newTestAgent(t)
	for _, c := range []struct {
		line string
		id   uint64
		msg  string
	}{
		{`not json`, 0, "decode request"},
		{`{"id":3,"cmd":"fly"}`, 3, "unknown command"},
		{`{"id":4,"cmd":"checksum","args":{"region":"missing"}}`, 4, "checksum missing: no such region"},
		{`{"id":5,"cmd":"stop","args":{"region":"missing"}}`, 5, "no such region"},
		{`{"id":6,"cmd":"dirty","args":{"region":"huge","size_mib":65536}}`, 6, "does not fit"},
	} {
		resp := call(t, a, c.line, nil)
		if resp.OK || resp.ID != c.id || !strings.Contains(resp.Error, c.msg) {
			t.Errorf("%s: got %+v, want error %q with id %d", c.line, resp, c.msg, c.id)
		}
	}
}

func TestDirtyChecksumStop(t *testing.T) {
	a := newTestAgent(t)
	var st agentapi.WorkloadStatus
	if r := call(t, a, `{"id":1,"cmd":"dirty","args":{"region":"r","size_mib":2,"seed":77,"passes":3}}`, &st); !r.OK {
		t.Fatalf("dirty: %s", r.Error)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Bounded wait for a finite workload to finish.
	for st.Running {
		if r := call(t, a, `{"id":2,"cmd":"ops","args":{"region":"r"}}`, &st); !r.OK {
			t.Fatalf("ops: %s", r.Error)
		}
		select {
		case <-ctx.Done():
			t.Fatal("workload did not finish")
		case <-time.After(10 * time.Millisecond):
		}
	}
	var sum agentapi.ChecksumResult
	if r := call(t, a, `{"id":3,"cmd":"checksum","args":{"region":"r"}}`, &sum); !r.OK {
		t.Fatalf("checksum: %s", r.Error)
	}
	want, err := agentapi.ExpectedChecksum(sum.SizeMiB, sum.Seed, sum.PassesDone, sum.PageInPass)
	if err != nil {
		t.Fatal(err)
	}
	if sum.SHA256 != hex.EncodeToString(want[:]) || sum.PassesDone != 3 || sum.PageInPass != 0 || st.PagesTotal != 3*512 {
		t.Errorf("checksum %+v (status %+v), want %x after exactly 3 passes", sum, st, want)
	}
}

func TestStopMidPassMatchesExpected(t *testing.T) {
	a := newTestAgent(t)
	if r := call(t, a, `{"id":1,"cmd":"dirty","args":{"region":"f","size_mib":4,"seed":5,"rate_mib_s":8}}`, nil); !r.OK {
		t.Fatalf("dirty: %s", r.Error)
	}
	var ops agentapi.WorkloadStatus
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for ops.PagesTotal == 0 {
		if r := call(t, a, `{"id":2,"cmd":"ops","args":{"region":"f"}}`, &ops); !r.OK {
			t.Fatalf("ops: %s", r.Error)
		}
		select {
		case <-ctx.Done():
			t.Fatal("no pages written")
		case <-time.After(10 * time.Millisecond):
		}
	}
	if r := call(t, a, `{"id":3,"cmd":"dirty","args":{"region":"f","size_mib":1}}`, nil); r.OK || !strings.Contains(r.Error, "busy") {
		t.Errorf("dirty over a running region: %+v, want a busy error", r)
	}
	var st agentapi.WorkloadStatus
	if r := call(t, a, `{"id":3,"cmd":"stop","args":{"region":"f"}}`, &st); !r.OK || st.Running {
		t.Fatalf("stop: %+v %s", st, r.Error)
	}
	var sum agentapi.ChecksumResult
	call(t, a, `{"id":4,"cmd":"checksum","args":{"region":"f"}}`, &sum)
	want, err := agentapi.ExpectedChecksum(4, 5, sum.PassesDone, sum.PageInPass)
	if err != nil {
		t.Fatal(err)
	}
	if sum.SHA256 != hex.EncodeToString(want[:]) || sum.PassesDone != st.PassesDone || sum.PageInPass != st.PageInPass {
		t.Errorf("after stop at %d+%d: checksum %+v, want %x", st.PassesDone, st.PageInPass, sum, want)
	}
	// A stopped region can be replaced under the same name.
	if r := call(t, a, `{"id":5,"cmd":"dirty","args":{"region":"f","size_mib":1,"passes":1}}`, nil); !r.OK {
		t.Errorf("dirty over a stopped region: %s", r.Error)
	}
}

func TestEchoOnLoopback(t *testing.T) {
	a := newTestAgent(t)
	// Find a free port, then hand it to the agent.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	if r := call(t, a, `{"id":1,"cmd":"echo","args":{"action":"start","port":`+strconv.Itoa(port)+`}}`, nil); !r.OK {
		t.Fatalf("echo start: %s", r.Error)
	}
	if r := call(t, a, `{"id":2,"cmd":"echo","args":{"action":"start","port":`+strconv.Itoa(port+1)+`}}`, nil); r.OK {
		t.Error("second echo port accepted while one runs")
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "abc" {
		t.Fatalf("tcp echo: %q %v", buf, err)
	}
	if r := call(t, a, `{"id":3,"cmd":"echo","args":{"action":"stop"}}`, nil); !r.OK {
		t.Fatalf("echo stop: %s", r.Error)
	}
	if _, err := c.Read(buf); err == nil {
		t.Error("connection still open after echo stop")
	}
}

func TestParseMemInfo(t *testing.T) {
	m, err := parseMemInfo("MemTotal:       223632 kB\nMemFree:        168552 kB\nHugePages_Total:       0\n")
	if err != nil || m["MemTotal"] != 223632 || m["HugePages_Total"] != 0 || len(m) != 3 {
		t.Errorf("got %v %v", m, err)
	}
	for _, s := range []string{"MemFree: 1 kB\n", "MemTotal: x kB\n", "MemTotal:\n"} {
		if _, err := parseMemInfo(s); err == nil {
			t.Errorf("parseMemInfo(%q): no error", s)
		}
	}
}
