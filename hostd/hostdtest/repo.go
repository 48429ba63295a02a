package hostdtest

import (
	"path/filepath"
	"testing"

	"hostd/checkpoint/pki"
	"hostd/hostd/config"
)

// RepoHost is a repo-role hostd (a page repository for cooperative swap)
// in a network namespace of its own, reached over a veth like BackupHost.
type RepoHost struct {
	*BackupHost
}

// RepoOptions shape the repository.
type RepoOptions struct {
	CapacityMiB int64 // default 256
	// Hosts are the client identities to issue certificates for (default
	// host1).
	Hosts []string
}

// StartRepo creates the namespace, the link, a test PKI and a repo-role
// hostd listening inside the namespace (memory unlocked: tests run many).
func StartRepo(tb testing.TB, binDir string, o RepoOptions) *RepoHost {
	tb.Helper()
	rh := &RepoHost{peerHost(tb, "hdrp", "hrp", 81)}
	rh.PKI = peerPKI(tb, rh.BackupIP, o.Hosts)
	rh.Addr = rh.BackupIP + ":7011"
	capMiB := o.CapacityMiB
	if capMiB == 0 {
		capMiB = 256
	}
	rh.Daemon = Start(tb, binDir, Options{Netns: rh.Netns, Edit: func(c *config.Config) {
		c.Roles = []string{config.RoleRepo}
		c.Repo.Listen = rh.Addr
		c.Repo.CapacityMiB = capMiB
		c.Repo.Lock = false
		c.Repo.TLS = config.TLS{CA: filepath.Join(rh.PKI, pki.CACert), Cert: filepath.Join(rh.PKI, pki.ServerCert), Key: filepath.Join(rh.PKI, pki.ServerKey)}
	}})
	return rh
}

// HostTLS points a host's [swap] at its client certificate from this PKI.
func (rh *RepoHost) HostTLS(c *config.Config, host string) {
	c.Swap.TLS = config.TLS{CA: filepath.Join(rh.PKI, pki.CACert),
		Cert: filepath.Join(rh.PKI, pki.ClientCert(host)), Key: filepath.Join(rh.PKI, pki.ClientKey(host))}
}

// Revive starts a fresh repository hostd (empty: a repository keeps
// nothing across a restart) on the same address, after Kill9 or Stop.
func (rh *RepoHost) Revive() {
	rh.tb.Helper()
	rh.Daemon.start()
}
