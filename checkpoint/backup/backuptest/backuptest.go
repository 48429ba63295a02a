// Package backuptest runs a real backup server in a test: a test PKI, a
// store directory and package backup's server on loopback, which can be
// stopped and started again on the same address (on the same store, or on
// a new one: a backup that lost everything).
package backuptest

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"hostd/checkpoint/backup"
	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/pki"
)

// Server is an in-process backup server. PKI holds the CA, the server's
// certificate (for 127.0.0.1 and localhost) and host1's client pair.
type Server struct {
	PKI, Store, Addr string
	stop             func()
}

// New generates the PKI, starts the server on 127.0.0.1:0 and stops it at
// the end of the test.
func New(tb testing.TB) *Server {
	tb.Helper()
	s := &Server{PKI: tb.TempDir(), Store: tb.TempDir()}
	if err := pki.Generate(s.PKI, pki.Spec{ServerNames: []string{"127.0.0.1", "localhost"}, Hosts: []string{"host1"}}); err != nil {
		tb.Fatal(err)
	}
	s.Start(tb, "127.0.0.1:0")
	tb.Cleanup(s.Down)
	return s
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// Start serves s.Store on addr (the previous Addr to come back where the
// clients expect it).
func (s *Server) Start(tb testing.TB, addr string) {
	tb.Helper()
	st, err := backupstore.Open(s.Store, backupstore.Options{Logger: quiet()})
	if err != nil {
		tb.Fatal(err)
	}
	tc, err := pki.DirServerConfig(s.PKI)
	if err != nil {
		st.Close()
		tb.Fatal(err)
	}
	srv, err := backup.New(st, tc, backup.Options{Logger: quiet(), HandshakeTimeout: 5 * time.Second})
	if err != nil {
		st.Close()
		tb.Fatal(err)
	}
	var ln net.Listener
	for i := 0; i < 50; i++ { // the old listener's port may take a moment
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		st.Close()
		tb.Fatal(err)
	}
	s.Addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ctx, ln)
	}()
	s.stop = func() {
		cancel()
		<-done
		st.Close()
	}
}

// Down stops the server, closing every session; idempotent.
func (s *Server) Down() {
	if s.stop != nil {
		s.stop()
		s.stop = nil
	}
}
