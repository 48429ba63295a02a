package integration

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"hostd/checkpoint/pki"
	"hostd/hostd/hostdtest"
)

// backupAccepts reports whether the backup completes a mutual TLS handshake
// with host1's identity from the PKI in dir.
func backupAccepts(t *testing.T, addr, dir string) error {
	t.Helper()
	host, _, _ := net.SplitHostPort(addr)
	cc, err := pki.DirClientConfig(dir, "host1", host)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cc)
	if err != nil {
		return err
	}
	defer c.Close()
	// TLS 1.3: the server's verdict on our certificate comes with the
	// first read; the backup waits for a Hello, so a timeout is success.
	_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.Is(err, io.EOF) || (errors.As(err, &ne) && ne.Timeout()) {
		return nil
	}
	return err
}

// SIGHUP reloads a running hostd's certificates instead of ending it: the
// backup role, renewed to another CA on disk, accepts that CA's hosts
// after the signal and no longer the old ones, and keeps serving.
func TestSIGHUPReloadsCertificates(t *testing.T) {
	bk := hostdtest.StartBackup(t, binDir, hostdtest.BackupOptions{})
	if err := backupAccepts(t, bk.Addr, bk.PKI); err != nil {
		t.Fatalf("before the renewal: %v", err)
	}
	renewed := t.TempDir()
	host, _, _ := net.SplitHostPort(bk.Addr)
	if err := pki.Generate(renewed, pki.Spec{ServerNames: []string{host}, Hosts: []string{"host1"}}); err != nil {
		t.Fatal(err)
	}
	// The old host identity, kept aside: the renewal overwrites the files.
	old := t.TempDir()
	for _, f := range []string{pki.CACert, pki.ClientCert("host1"), pki.ClientKey("host1")} {
		copyFile(t, filepath.Join(bk.PKI, f), filepath.Join(old, f))
	}
	for _, f := range []string{pki.CACert, pki.ServerCert, pki.ServerKey} {
		copyFile(t, filepath.Join(renewed, f), filepath.Join(bk.PKI, f))
	}
	// Renewed on disk, not yet reloaded: the running identity is the old.
	if err := backupAccepts(t, bk.Addr, renewed); err == nil {
		t.Fatal("the renewed certificates were used before any reload")
	}
	if err := syscall.Kill(bk.PID(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, _ := os.ReadFile(bk.LogPath())
		if line := logLine(string(b), "reloaded"); line != "" {
			if !strings.Contains(line, "ok=true") && !strings.Contains(line, `"ok":true`) {
				t.Fatalf("the reload failed:\n%s", b)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reload logged within 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if exited, err := bk.Exited(); exited {
		t.Fatalf("hostd ended on SIGHUP: %v", err)
	}
	if err := backupAccepts(t, bk.Addr, renewed); err != nil {
		t.Fatalf("a host of the renewed CA after the reload: %v", err)
	}
	if err := backupAccepts(t, bk.Addr, old); err == nil {
		t.Fatal("a host of the old CA is still accepted after the reload")
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// logLine is the first line of a hostd log (text or JSON) with message msg.
func logLine(log, msg string) string {
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "msg="+msg+" ") || strings.Contains(l, `"msg":"`+msg+`"`) {
			return l
		}
	}
	return ""
}
