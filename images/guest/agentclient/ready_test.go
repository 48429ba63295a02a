package agentclient

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestWaitReadyFromLog(t *testing.T) {
	log := filepath.Join(t.TempDir(), "serial.log")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// The file does not exist yet, then holds a partial line: both mean
	// "not yet", never an error.
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	if _, err := WaitReady(short, log); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("missing log: %v, want a deadline error", err)
	}
	boot := "SeaBIOS\r\n[ 1.0] kernel noise\r\nHOSTD-AGENT READY uptime_ms=2100 kernel=6.1.0-x"
	if err := os.WriteFile(log, []byte(boot), 0o644); err != nil {
		t.Fatal(err)
	}
	short2, cancelShort2 := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort2()
	if _, err := WaitReady(short2, log); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("partial line: %v, want a deadline error", err)
	}

	// Complete the line from another goroutine while WaitReady polls.
	go func() {
		time.Sleep(100 * time.Millisecond)
		f, err := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
		if err == nil {
			f.WriteString(" port=/dev/vport0p1\r\nHOSTD-AGENT RESULT {}\r\nHOSTD-AGENT READY uptime_ms=9 kernel=k2\r\n")
			f.Close()
		}
	}()
	r, err := WaitReady(ctx, log)
	if err != nil {
		t.Fatal(err)
	}
	if r.UptimeMS != 2100 || r.Kernel != "6.1.0-x" || r.Fields["port"] != "/dev/vport0p1" {
		t.Errorf("first ready: %+v", r)
	}
	r2, err := WaitReadyFrom(ctx, log, r.Offset)
	if err != nil {
		t.Fatal(err)
	}
	if r2.UptimeMS != 9 || r2.Kernel != "k2" || r2.Offset <= r.Offset {
		t.Errorf("second ready: %+v after offset %d", r2, r.Offset)
	}

	if err := os.WriteFile(log, []byte("HOSTD-AGENT READY kernel=x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := WaitReady(ctx, log); err == nil {
		t.Error("ready line without uptime_ms accepted")
	}
}
