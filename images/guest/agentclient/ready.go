package agentclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"hostd/images/guest/agentapi"
)

// Ready is the agent's parsed readiness line.
type Ready struct {
	agentapi.Ready
	// Offset is the byte offset just past the line in the serial log; pass
	// it to WaitReadyFrom to wait for the next one (after the VM restarts
	// or the agent is restarted) in a log that is appended to.
	Offset int64
}

// pollInterval is how often the serial log is re-read. QEMU writes it as
// the guest prints; there is no notification to wait on.
const pollInterval = 50 * time.Millisecond

// WaitReady waits until the serial log holds the agent's ready line and
// returns its fields. ctx bounds the wait; a missing log file is waited for
// too, since QEMU creates it.
func WaitReady(ctx context.Context, serialLogPath string) (Ready, error) {
	return WaitReadyFrom(ctx, serialLogPath, 0)
}

// WaitReadyFrom is WaitReady for lines starting at byte offset from.
func WaitReadyFrom(ctx context.Context, serialLogPath string, from int64) (Ready, error) {
	for {
		r, found, err := scanReady(serialLogPath, from)
		if err != nil {
			return Ready{}, err
		}
		if found {
			return r, nil
		}
		t := time.NewTimer(pollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return Ready{}, fmt.Errorf("wait for agent ready line in %s: %w", serialLogPath, ctx.Err())
		case <-t.C:
		}
	}
}

// scanReady looks for a complete ready line after from.
func scanReady(path string, from int64) (Ready, bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Ready{}, false, nil
	}
	if err != nil {
		return Ready{}, false, fmt.Errorf("wait for agent ready line: %w", err)
	}
	if from > int64(len(b)) {
		return Ready{}, false, nil
	}
	rest := b[from:]
	i := bytes.Index(rest, []byte(agentapi.ReadyPrefix))
	if i < 0 {
		return Ready{}, false, nil
	}
	end := bytes.IndexByte(rest[i:], '\n')
	if end < 0 {
		return Ready{}, false, nil // line still being written
	}
	parsed, err := agentapi.ParseReady(string(bytes.TrimRight(rest[i:i+end], "\r")))
	if err != nil {
		return Ready{}, false, fmt.Errorf("wait for agent ready line in %s: %w", path, err)
	}
	return Ready{Ready: parsed, Offset: from + int64(i+end+1)}, true, nil
}
