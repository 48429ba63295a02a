package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"hostd/images/guest/agentapi"
)

// findPort returns the /dev/vportNpM whose sysfs name is want. Without
// udev or mdev the device nodes come from devtmpfs, and the name lives only
// in sysfs. The wait is bounded: a VM started without the channel gets
// "none" and still boots.
func findPort(ctx context.Context, want string, wait time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err == nil && strings.TrimSpace(string(b)) == want {
				return "/dev/" + filepath.Base(filepath.Dir(n)), nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("find virtio-serial port %q: not present after %s", want, wait)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// servePort answers requests on the port forever. A read of 0 bytes means
// the host end is not connected (QEMU's socket has no client, or the VM was
// just restored by a new QEMU); the port then reports hang-up on every poll,
// so the loop naps instead of spinning and drops any half-received line,
// which belonged to the previous connection.
func servePort(ctx context.Context, a *agent, path string) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		a.console.print(fmt.Sprintf("HOSTD-AGENT ERROR open %s: %v", path, err))
		return
	}
	defer f.Close()
	buf := make([]byte, 16*1024)
	var pending []byte
	discarding := false // inside an overlong line, until its newline
	for ctx.Err() == nil {
		n, err := f.Read(buf)
		if n == 0 || err != nil {
			if err != nil && !errors.Is(err, io.EOF) {
				a.console.print(fmt.Sprintf("HOSTD-AGENT ERROR read %s: %v", path, err))
			}
			pending, discarding = pending[:0], false
			time.Sleep(100 * time.Millisecond)
			continue
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			l := pending[:i]
			if discarding {
				discarding = false
			} else if len(bytes.TrimSpace(l)) > 0 {
				a.reply(f, a.handle(l))
			}
			pending = append(pending[:0], pending[i+1:]...)
		}
		if len(pending) > agentapi.MaxLineBytes {
			a.reply(f, errorResponse(0, fmt.Errorf("read request: line exceeds %d bytes: %w", agentapi.MaxLineBytes, agentapi.ErrBadRequest)))
			pending, discarding = pending[:0], true
		}
	}
}

func (a *agent) reply(w io.Writer, resp agentapi.Response) {
	b := mustJSON(resp)
	a.console.print(agentapi.ResultPrefix + " " + string(b))
	if _, err := w.Write(append(b, '\n')); err != nil {
		a.console.print(fmt.Sprintf("HOSTD-AGENT ERROR write response %d: %v", resp.ID, err))
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own plain structs are marshalled; failing here is a bug.
		panic(fmt.Sprintf("marshal %T: %v", v, err))
	}
	return b
}
