// Package repotest starts real page repositories on loopback, with a
// generated test PKI, for the tests and benchmarks of repo, swapdev and
// hostd. Everything it starts stops when the test ends.
package repotest

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"hostd/checkpoint/pki"
	"hostd/dataplane/repo"
)

// ServerName is the name (an address) in the generated server certificate.
const ServerName = "127.0.0.1"

// PKI writes a test CA, a server certificate for ServerName and a client
// certificate per host into a temporary directory and returns it.
func PKI(tb testing.TB, hosts ...string) string {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "pki")
	if err := pki.Generate(dir, pki.Spec{ServerNames: []string{ServerName}, Hosts: hosts}); err != nil {
		tb.Fatal(err)
	}
	return dir
}

// ClientTLS is host's client TLS config from a PKI directory.
func ClientTLS(tb testing.TB, dir, host string) *tls.Config {
	tb.Helper()
	c, err := pki.DirClientConfig(dir, host, ServerName)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// Repo is a running repository server.
type Repo struct {
	tb   testing.TB
	dir  string
	opts repo.ServerOptions
	// Addr stays the same across Restart.
	Addr   string
	Server *repo.Server

	cancel context.CancelFunc
	done   chan error
}

// Start runs a repository with opts (NoLock is forced: tests start many)
// on a free loopback port.
func Start(tb testing.TB, dir string, opts repo.ServerOptions) *Repo {
	tb.Helper()
	r := &Repo{tb: tb, dir: dir, opts: opts, Addr: "127.0.0.1:0"}
	r.start()
	tb.Cleanup(r.Stop)
	return r
}

func (r *Repo) start() {
	r.tb.Helper()
	conf, err := pki.DirServerConfig(r.dir)
	if err != nil {
		r.tb.Fatal(err)
	}
	opts := r.opts
	opts.NoLock = true
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	srv, err := repo.NewServer(conf, opts)
	if err != nil {
		r.tb.Fatal(err)
	}
	var ln net.Listener
	for i := 0; i < 50; i++ { // the old socket of a Restart may linger a moment
		ln, err = net.Listen("tcp", r.Addr)
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		srv.Close()
		r.tb.Fatal(err)
	}
	r.Addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	r.Server, r.cancel, r.done = srv, cancel, make(chan error, 1)
	go func() { r.done <- srv.Serve(ctx, ln) }()
}

// Stop kills the repository (its pages are gone). Stopping twice is fine.
func (r *Repo) Stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		r.tb.Error("repository server did not stop")
	}
	r.Server.Close()
	r.cancel = nil
}

// Restart starts a fresh repository (empty) on the same address.
func (r *Repo) Restart() {
	r.tb.Helper()
	r.Stop()
	r.start()
}
