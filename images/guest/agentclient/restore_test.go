package agentclient_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"hostd/images/guest/agentapi"
	"hostd/images/guest/agentclient"
	"hostd/images/guest/guestimage"
)

// qmp is the least of a QMP client: enough to save a VM's state.
type qmp struct {
	conn net.Conn
	r    *bufio.Reader
}

func dialQMP(ctx context.Context, path string) (*qmp, error) {
	var conn net.Conn
	var err error
	for conn == nil {
		conn, err = (&net.Dialer{}).DialContext(ctx, "unix", path)
		if err != nil {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("dial qmp %s: %w", path, err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	q := &qmp{conn: conn, r: bufio.NewReader(conn)}
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	if _, err := q.run("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// run executes a command and returns its "return" value, skipping events.
func (q *qmp) run(cmd string, args any) (json.RawMessage, error) {
	req, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": args})
	if args == nil {
		req, _ = json.Marshal(map[string]any{"execute": cmd})
	}
	if _, err := q.conn.Write(append(req, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for range 1000 {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage  `json:"return"`
			Error  *json.RawMessage `json:"error"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s", cmd, *resp.Error)
		}
		if resp.Return != nil {
			return resp.Return, nil
		}
	}
	return nil, fmt.Errorf("qmp %s: no reply among 1000 events", cmd)
}

// TestGuestSurvivesSaveRestore saves a running guest's state to a file,
// kills QEMU, starts a new QEMU from the file, and checks what hostd's
// restore tests rely on: the agent answers the new QEMU's socket, a
// running workload's pages_total continues from where it was, and a region
// still verifies against the host-computed checksum.
func TestGuestSurvivesSaveRestore(t *testing.T) {
	img := guestimage.Require(t)
	dir := t.TempDir()
	state := filepath.Join(dir, "vmstate")
	srcQMP := filepath.Join(dir, "src.qmp")
	src := bootVM(t, img, "", "-qmp", "unix:"+srcQMP+",server=on,wait=off")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if _, err := agentclient.WaitReady(ctx, src.serial); err != nil {
		t.Fatal(err)
	}
	c, err := agentclient.Dial(ctx, src.sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Dirty(ctx, agentapi.DirtyArgs{Region: "kept", SizeMiB: 8, Seed: 3, Passes: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Dirty(ctx, agentapi.DirtyArgs{Region: "live", SizeMiB: 4, Seed: 4, RateMiBs: 8}); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, "kept region written", func() (bool, error) {
		st, err := c.Ops(ctx, "kept")
		return !st.Running, err
	}); err != nil {
		t.Fatal(err)
	}

	var before agentapi.WorkloadStatus
	if err := waitFor(ctx, "live workload under way", func() (bool, error) {
		before, err = c.Ops(ctx, "live")
		return before.PagesTotal > 0, err
	}); err != nil {
		t.Fatal(err)
	}
	c.Close()
	q, err := dialQMP(ctx, srcQMP)
	if err != nil {
		t.Fatal(err)
	}
	defer q.conn.Close()
	if _, err := q.run("stop", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := q.run("migrate", map[string]any{"uri": "exec:cat > " + state}); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, "migration to file", func() (bool, error) {
		raw, err := q.run("query-migrate", nil)
		if err != nil {
			return false, err
		}
		var st struct{ Status string }
		if err := json.Unmarshal(raw, &st); err != nil {
			return false, err
		}
		if st.Status == "failed" {
			return false, fmt.Errorf("migration failed: %s", raw)
		}
		return st.Status == "completed", nil
	}); err != nil {
		t.Fatal(err)
	}
	src.stop()

	dstQMP := filepath.Join(dir, "dst.qmp")
	dst := bootVM(t, img, "", "-incoming", "exec:cat "+state, "-qmp", "unix:"+dstQMP+",server=on,wait=off")
	q2, err := dialQMP(ctx, dstQMP)
	if err != nil {
		t.Fatal(err)
	}
	defer q2.conn.Close()
	// The source was paused when saved, so the destination loads paused
	// and waits for cont, as a restore does.
	if err := waitFor(ctx, "incoming state loaded", func() (bool, error) {
		raw, err := q2.run("query-status", nil)
		if err != nil {
			return false, err
		}
		var st struct{ Status string }
		if err := json.Unmarshal(raw, &st); err != nil {
			return false, err
		}
		return st.Status == "paused", nil
	}); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	if _, err := q2.run("cont", nil); err != nil {
		t.Fatal(err)
	}
	c2, err := agentclient.Dial(ctx, dst.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	after, err := c2.Ops(ctx, "live")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("measure: cont to first agent answer on the new QEMU %.3fs; pages_total %d before save, %d after restore",
		time.Since(resumed).Seconds(), before.PagesTotal, after.PagesTotal)
	if !after.Running || after.PagesTotal < before.PagesTotal {
		t.Fatalf("after restore: %+v, before save: %+v", after, before)
	}
	first := after.PagesTotal
	if err := waitFor(ctx, "pages_total to keep growing after restore", func() (bool, error) {
		st, err := c2.Ops(ctx, "live")
		if err != nil {
			return false, err
		}
		if st.PagesTotal < first {
			return false, fmt.Errorf("pages_total went back from %d to %d", first, st.PagesTotal)
		}
		return st.PagesTotal > first, nil
	}); err != nil {
		t.Fatal(err)
	}
	got, err := c2.VerifyChecksum(ctx, "kept")
	if err != nil {
		t.Fatal(err)
	}
	if got.PassesDone != 1 {
		t.Errorf("kept region after restore: %+v", got)
	}
	if _, err := c2.VerifyChecksum(ctx, "live"); err != nil {
		t.Error(err)
	}
}
