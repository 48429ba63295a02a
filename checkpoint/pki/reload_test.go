package pki

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// handshake dials srv with a client of dir's CA and host and reports
// whether the mutual handshake completed.
func handshake(t *testing.T, addr, dir, host string) error {
	t.Helper()
	cc, err := DirClientConfig(dir, host, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cc)
	if err != nil {
		return err
	}
	defer c.Close()
	// TLS 1.3: the server's verdict on the client certificate arrives
	// with the first read.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// A server identity reloaded from renewed files (another CA, another
// certificate) is used by the next handshakes; a reload that fails keeps
// the identity in use.
func TestServerIdentityReload(t *testing.T) {
	oldDir, newDir, live := t.TempDir(), t.TempDir(), t.TempDir()
	for _, d := range []string{oldDir, newDir} {
		if err := Generate(d, Spec{ServerNames: []string{"127.0.0.1"}, Hosts: []string{"hostA"}}); err != nil {
			t.Fatal(err)
		}
	}
	install := func(from string) {
		for _, f := range []string{CACert, ServerCert, ServerKey} {
			b, err := os.ReadFile(filepath.Join(from, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(live, f), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(oldDir)
	id, err := NewServerIdentity(filepath.Join(live, CACert), filepath.Join(live, ServerCert), filepath.Join(live, ServerKey))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", id.Config())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
			}()
		}
	}()
	addr := ln.Addr().String()
	if err := handshake(t, addr, oldDir, "hostA"); err != nil {
		t.Fatalf("old client before the reload: %v", err)
	}
	if err := handshake(t, addr, newDir, "hostA"); err == nil {
		t.Fatal("a client of the new CA was accepted before the reload")
	}

	install(newDir)
	if err := id.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := handshake(t, addr, newDir, "hostA"); err != nil {
		t.Fatalf("new client after the reload: %v", err)
	}
	if err := handshake(t, addr, oldDir, "hostA"); err == nil {
		t.Fatal("a client of the old CA was still accepted after the reload")
	}

	// A broken file: the reload fails and the new identity stays.
	if err := os.WriteFile(filepath.Join(live, ServerKey), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := id.Reload(); err == nil {
		t.Fatal("a reload from a broken key succeeded")
	}
	if err := handshake(t, addr, newDir, "hostA"); err != nil {
		t.Fatalf("after a failed reload: %v", err)
	}
}
