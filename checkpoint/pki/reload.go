package pki

import (
	"crypto/tls"
	"fmt"
	"sync/atomic"
)

// ServerIdentity is a server's TLS identity (certificate, key and the CA
// that vouches for clients) that Reload reads again from its files: an
// operator renews certificates and sends SIGHUP, and every handshake after
// it uses the new ones. Connections already made keep theirs.
type ServerIdentity struct {
	ca, cert, key string
	cur           atomic.Pointer[tls.Config]
}

// NewServerIdentity loads the identity once; a file that cannot be read
// fails here, at start.
func NewServerIdentity(caFile, certFile, keyFile string) (*ServerIdentity, error) {
	id := &ServerIdentity{ca: caFile, cert: certFile, key: keyFile}
	if err := id.Reload(); err != nil {
		return nil, err
	}
	return id, nil
}

// Reload reads the files again. On any error the identity in use stays.
func (id *ServerIdentity) Reload() error {
	c, err := ServerConfig(id.ca, id.cert, id.key)
	if err != nil {
		return fmt.Errorf("reload server identity (%s): %w; the previous one stays in use", id.cert, err)
	}
	id.cur.Store(c)
	return nil
}

// Config is the server's TLS config: TLS 1.3 and verified client
// certificates, each handshake with the identity loaded last.
func (id *ServerIdentity) Config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return id.cur.Load(), nil
		},
	}
}
