package hostdtest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"hostd/checkpoint/pki"
	"hostd/hostd/config"
)

// BackupHost is a backup-role hostd in a network namespace of its own, as
// a separate server: hosts reach it over a veth whose host end can be
// throttled with tc, so the link to the backup has a known bandwidth.
type BackupHost struct {
	*Daemon
	Netns string
	Addr  string // host:port of the backup listener
	PKI   string // directory with the CA, the server's and host1's keys
	// HostIP and BackupIP are the veth's two addresses.
	HostIP, BackupIP string
	hostDev          string
}

// BackupOptions shape the backup's link.
type BackupOptions struct {
	// RateMbit throttles host -> backup traffic with a tbf qdisc on the
	// host end of the veth (0: unthrottled).
	RateMbit int
	// Hosts are the client identities to issue certificates for (default
	// host1).
	Hosts []string
}

// StartBackup creates the namespace, the link, a test PKI and a
// backup-role hostd listening inside the namespace. Everything is removed
// at the end of the test.
func StartBackup(tb testing.TB, binDir string, o BackupOptions) *BackupHost {
	tb.Helper()
	bh := peerHost(tb, "hdbk", "hbk", 79)
	if o.RateMbit > 0 {
		bh.Throttle(tb, o.RateMbit)
	}
	bh.PKI = peerPKI(tb, bh.BackupIP, o.Hosts)
	bh.Addr = bh.BackupIP + ":7443"
	bh.Daemon = Start(tb, binDir, Options{Netns: bh.Netns, Edit: func(c *config.Config) {
		c.Roles = []string{config.RoleBackup}
		c.Backup.Listen = bh.Addr
		c.Backup.TLS = config.TLS{CA: filepath.Join(bh.PKI, pki.CACert), Cert: filepath.Join(bh.PKI, pki.ServerCert), Key: filepath.Join(bh.PKI, pki.ServerKey)}
	}})
	return bh
}

// peerHost makes a network namespace (nsPrefix + a random suffix) and a
// veth to it from this host's namespace (devPrefix + suffix), addressed
// out of 10.<net>.0.0/16 as a /30 chosen by the suffix so that parallel
// test binaries do not collide. Both are removed at the end of the test.
func peerHost(tb testing.TB, nsPrefix, devPrefix string, net int) *BackupHost {
	tb.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	sfx := hex.EncodeToString(b)
	n := int(b[0])<<8 | int(b[1])
	hostIP := fmt.Sprintf("10.%d.%d.%d", net, (n>>6)&0xff, (n&0x3f)*4+1)
	peerIP := fmt.Sprintf("10.%d.%d.%d", net, (n>>6)&0xff, (n&0x3f)*4+2)
	bh := &BackupHost{Netns: nsPrefix + sfx, HostIP: hostIP, BackupIP: peerIP, hostDev: devPrefix + sfx}
	run := func(args ...string) {
		tb.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			tb.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", bh.Netns)
	tb.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", bh.hostDev).Run()
		_ = exec.Command("ip", "netns", "del", bh.Netns).Run()
	})
	run("ip", "-n", bh.Netns, "link", "set", "lo", "up")
	run("ip", "link", "add", bh.hostDev, "type", "veth", "peer", "name", "bk0", "netns", bh.Netns)
	run("ip", "addr", "add", hostIP+"/30", "dev", bh.hostDev)
	run("ip", "-n", bh.Netns, "addr", "add", peerIP+"/30", "dev", "bk0")
	run("ip", "link", "set", bh.hostDev, "up")
	run("ip", "-n", bh.Netns, "link", "set", "bk0", "up")
	return bh
}

// peerPKI writes a test PKI whose server certificate names serverIP and
// which has a client certificate per host (default host1).
func peerPKI(tb testing.TB, serverIP string, hosts []string) string {
	tb.Helper()
	if len(hosts) == 0 {
		hosts = []string{"host1"}
	}
	dir, err := os.MkdirTemp("", "hdpki")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := pki.Generate(dir, pki.Spec{ServerNames: []string{serverIP}, Hosts: hosts}); err != nil {
		tb.Fatal(err)
	}
	return dir
}

// Throttle sets (or changes) the host -> backup rate limit.
func (bh *BackupHost) Throttle(tb testing.TB, mbit int) {
	tb.Helper()
	// burst: enough for the rate at HZ=250 (a few ms of traffic) and a
	// 64 KiB TSO frame; latency bounds the queue.
	burst := max(mbit*1000*1000/8/250, 96*1024)
	args := []string{"qdisc", "replace", "dev", bh.hostDev, "root", "tbf", "rate", fmt.Sprintf("%dmbit", mbit),
		"burst", fmt.Sprint(burst), "latency", "50ms"}
	if out, err := exec.Command("tc", args...).CombinedOutput(); err != nil {
		tb.Fatalf("tc %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// HostTLS points a host's [checkpoint] at its certificate from this PKI.
func (bh *BackupHost) HostTLS(c *config.Config, host string) {
	c.Checkpoint.TLS = config.TLS{CA: filepath.Join(bh.PKI, pki.CACert),
		Cert: filepath.Join(bh.PKI, pki.ClientCert(host)), Key: filepath.Join(bh.PKI, pki.ClientKey(host))}
}

// StoreDir is the backup's checkpoint store.
func (bh *BackupHost) StoreDir() string { return bh.Config.BackupDir() }

// Link gives another namespace (a second host) its own veth to the
// backup and a route to its address; it returns that host's address.
func (bh *BackupHost) Link(tb testing.TB, ns string) string {
	tb.Helper()
	b := make([]byte, 2)
	_, _ = rand.Read(b)
	sfx := hex.EncodeToString(b)
	hostIP := fmt.Sprintf("10.80.%d.%d", b[0], (int(b[1])&0x3f)*4+1)
	peerIP := fmt.Sprintf("10.80.%d.%d", b[0], (int(b[1])&0x3f)*4+2)
	hostDev, bkDev := "hl"+sfx, "bl"+sfx
	run := func(args ...string) {
		tb.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			tb.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "link", "add", hostDev, "netns", ns, "type", "veth", "peer", "name", bkDev, "netns", bh.Netns)
	run("ip", "-n", ns, "addr", "add", hostIP+"/30", "dev", hostDev)
	run("ip", "-n", bh.Netns, "addr", "add", peerIP+"/30", "dev", bkDev)
	run("ip", "-n", ns, "link", "set", hostDev, "up")
	run("ip", "-n", bh.Netns, "link", "set", bkDev, "up")
	run("ip", "-n", ns, "route", "add", bh.BackupIP+"/32", "via", peerIP)
	return hostIP
}
