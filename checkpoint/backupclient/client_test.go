package backupclient

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"hostd/checkpoint/wire"
)

func TestOpenRejectsBadConfig(t *testing.T) {
	ctx := context.Background()
	if _, err := Open(ctx, Config{VMID: "../x", ImageSize: 4096}); !errors.Is(err, wire.ErrMalformed) {
		t.Fatalf("bad vm id: %v", err)
	}
	if _, err := Open(ctx, Config{VMID: "vm", ImageSize: 1000}); err == nil {
		t.Fatal("unaligned image size accepted")
	}
	// A dead peer: nothing listens on the port any more.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	_, err := Open(ctx, Config{Addr: addr, VMID: "vm", ImageSize: 4096, DialTimeout: 2 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "connect backup") {
		t.Fatalf("dead peer: %v", err)
	}
}

func TestAllZero(t *testing.T) {
	b := make([]byte, 4096+3)
	if !allZero(b) {
		t.Fatal("zeros")
	}
	b[4096+2] = 1
	if allZero(b) {
		t.Fatal("tail byte missed")
	}
}
