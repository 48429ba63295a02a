package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// File names inside a PKI directory.
const (
	CACert     = "ca.crt"
	CAKey      = "ca.key"
	ServerCert = "server.crt"
	ServerKey  = "server.key"
)

// ClientCert and ClientKey name a host's client certificate files.
func ClientCert(host string) string { return "client-" + host + ".crt" }
func ClientKey(host string) string  { return "client-" + host + ".key" }

// Spec says what Generate creates.
type Spec struct {
	// ServerNames are DNS names or IP addresses of the backup server.
	ServerNames []string
	// Hosts are the client identities (certificate common names).
	Hosts []string
	// Validity of all certificates; default one year.
	Validity time.Duration
}

// Generate writes a new CA, a server certificate and one client certificate
// per host into dir (created 0700; keys 0600). Existing files are replaced.
func Generate(dir string, spec Spec) error {
	if len(spec.ServerNames) == 0 || len(spec.Hosts) == 0 {
		return fmt.Errorf("generate pki in %s: need at least one server name and one host", dir)
	}
	if spec.Validity == 0 {
		spec.Validity = 365 * 24 * time.Hour
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("generate pki: %w", err)
	}
	now := time.Now().Add(-time.Hour) // tolerate clock skew between hosts
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate pki: ca key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "hostd backup CA"},
		NotBefore:             now,
		NotAfter:              now.Add(spec.Validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("generate pki: ca certificate: %w", err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	if err := writePair(dir, CACert, CAKey, caDER, caKey); err != nil {
		return err
	}
	leaf := func(cn string, usage x509.ExtKeyUsage, names []string, certName, keyName string) error {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate pki: key for %s: %w", cn, err)
		}
		t := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    now,
			NotAfter:     now.Add(spec.Validity),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		for _, n := range names {
			if ip := net.ParseIP(n); ip != nil {
				t.IPAddresses = append(t.IPAddresses, ip)
			} else {
				t.DNSNames = append(t.DNSNames, n)
			}
		}
		der, err := x509.CreateCertificate(rand.Reader, t, ca, &k.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("generate pki: certificate for %s: %w", cn, err)
		}
		return writePair(dir, certName, keyName, der, k)
	}
	if err := leaf(spec.ServerNames[0], x509.ExtKeyUsageServerAuth, spec.ServerNames, ServerCert, ServerKey); err != nil {
		return err
	}
	for _, h := range spec.Hosts {
		if h == "" || filepath.Base(h) != h {
			return fmt.Errorf("generate pki: bad host name %q", h)
		}
		if err := leaf(h, x509.ExtKeyUsageClientAuth, nil, ClientCert(h), ClientKey(h)); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func writePair(dir, certName, keyName string, der []byte, k *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return fmt.Errorf("generate pki: marshal key: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, keyName), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		return fmt.Errorf("generate pki: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, certName), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return fmt.Errorf("generate pki: %w", err)
	}
	return nil
}

func loadPool(caFile string) (*x509.CertPool, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, errors.New("no certificate in " + caFile)
	}
	return pool, nil
}

// ServerConfig loads a backup server's TLS config: TLS 1.3 only, and every
// client must present a certificate signed by the CA in caFile.
func ServerConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	pool, err := loadPool(caFile)
	if err != nil {
		return nil, fmt.Errorf("load server tls config: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load server tls config: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, nil
}

// ClientConfig loads a host's TLS config for reaching the backup server
// named serverName (must match the server certificate).
func ClientConfig(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	pool, err := loadPool(caFile)
	if err != nil {
		return nil, fmt.Errorf("load client tls config: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load client tls config: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
	}, nil
}

// DirServerConfig and DirClientConfig load from a directory Generate wrote.
func DirServerConfig(dir string) (*tls.Config, error) {
	return ServerConfig(filepath.Join(dir, CACert), filepath.Join(dir, ServerCert), filepath.Join(dir, ServerKey))
}

func DirClientConfig(dir, host, serverName string) (*tls.Config, error) {
	return ClientConfig(filepath.Join(dir, CACert), filepath.Join(dir, ClientCert(host)), filepath.Join(dir, ClientKey(host)), serverName)
}
