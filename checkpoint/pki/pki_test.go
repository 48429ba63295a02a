package pki

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"testing"
)

// TestGenerateHandshake: the generated certificates complete a mutual TLS
// 1.3 handshake over loopback, and the client's identity is its host name.
func TestGenerateHandshake(t *testing.T) {
	dir := t.TempDir()
	if err := Generate(dir, Spec{ServerNames: []string{"backup.test", "127.0.0.1"}, Hosts: []string{"hostA"}}); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(filepath.Join(dir, ClientKey("hostA"))); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("client key mode: %v %v", st.Mode(), err)
	}
	sc, err := DirServerConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := DirClientConfig(dir, "hostA", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", sc)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			got <- "handshake: " + err.Error()
			return
		}
		st := tc.ConnectionState()
		if st.Version != tls.VersionTLS13 {
			got <- "not TLS 1.3"
			return
		}
		got <- st.PeerCertificates[0].Subject.CommonName
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), cc)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if id := <-got; id != "hostA" {
		t.Fatalf("server saw %q", id)
	}
}

func TestGenerateRejectsBadSpec(t *testing.T) {
	if err := Generate(t.TempDir(), Spec{ServerNames: []string{"x"}}); err == nil {
		t.Fatal("no hosts accepted")
	}
	if err := Generate(t.TempDir(), Spec{ServerNames: []string{"x"}, Hosts: []string{"../evil"}}); err == nil {
		t.Fatal("path in host name accepted")
	}
	if _, err := DirServerConfig(t.TempDir()); err == nil {
		t.Fatal("empty directory loaded")
	}
}
