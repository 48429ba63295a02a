package libvirt

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"hostd/xen"
)

// TestDevices boots a guest with a raw disk and two NICs: one on a tap the
// test made (libvirt must use it and leave it), one on a tap libvirt makes
// (and removes). Through the first the host reaches the guest agent's echo
// server, so the NIC carries real traffic; the kernel names the disk.
func TestDevices(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip(8) to make a tap")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	var rnd [3]byte
	rand.Read(rnd[:])
	suffix := hex.EncodeToString(rnd[:])
	ownTap, libvirtTap := "txen"+suffix, "txenl"+suffix
	// A /30 out of 10.213.0.0/16, picked at random to stay clear of
	// other tests on this host.
	subnet := fmt.Sprintf("10.213.%d.%d", rnd[0], rnd[1]&0xfc)
	hostIP, guestIP := subnet[:strings.LastIndex(subnet, ".")+1], ""
	last := int(rnd[1] & 0xfc)
	hostIP = fmt.Sprintf("%s%d", hostIP, last+1)
	guestIP = fmt.Sprintf("10.213.%d.%d", rnd[0], last+2)
	for _, args := range [][]string{
		{"tuntap", "add", "dev", ownTap, "mode", "tap"},
		{"addr", "add", hostIP + "/30", "dev", ownTap},
		{"link", "set", ownTap, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", ownTap).Run() })

	dir := shortTempDir(t)
	disk := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 8<<20); err != nil {
		t.Fatal(err)
	}
	name := uniqueName(t)
	spec := guestSpec(t, g, name, dir)
	const echoPort = 7007
	spec.Cmdline += fmt.Sprintf(" hostd.ip=%s/30 hostd.echo=%d", guestIP, echoPort)
	spec.Disks = []xen.Disk{{Path: disk}}
	spec.NICs = []xen.NIC{{Tap: ownTap}, {Tap: libvirtTap, MTU: 1400}}
	cleanupDomain(t, d, name)
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	info, err := d.Domain(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	rec := info.Spec
	if rec == nil || len(rec.NICs) != 2 || rec.NICs[0].MAC == "" || rec.Disks[0].Target != "vda" || rec.Disks[0].Format != "raw" {
		t.Fatalf("recorded spec: %+v", rec)
	}
	if err := d.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitSerial(t, spec.SerialLog, "HOSTD-AGENT READY", 1, bootTimeout)

	// What libvirt runs: both NICs on their taps with our MACs.
	live := liveXML(t, d, ctx, name)
	if len(live.Devices.Interfaces) != 2 {
		t.Fatalf("live interfaces: %+v", live.Devices.Interfaces)
	}
	for i, iface := range live.Devices.Interfaces {
		if iface.Target == nil || iface.Target.Dev != spec.NICs[i].Tap || iface.MAC.Address != rec.NICs[i].MAC {
			t.Errorf("live interface %d: target %+v mac %+v, want %s %s", i, iface.Target, iface.MAC, spec.NICs[i].Tap, rec.NICs[i].MAC)
		}
	}
	if _, err := net.InterfaceByName(libvirtTap); err != nil {
		t.Errorf("libvirt did not make tap %s: %v", libvirtTap, err)
	}
	// libvirt sets the MTU of the tap it made; an existing tap's MTU is
	// its owner's (libvirt leaves managed='no' taps alone).
	if ifc, err := net.InterfaceByName(libvirtTap); err != nil || ifc.MTU != 1400 {
		t.Errorf("libvirt's tap %s: %+v, %v (want mtu 1400 from the spec)", libvirtTap, ifc, err)
	}
	if m := live.Devices.Interfaces[1].MTU; m == nil || m.Size != 1400 {
		t.Errorf("live interface 1 mtu %+v, want 1400", m)
	}

	serial, _ := os.ReadFile(spec.SerialLog)
	if !strings.Contains(string(serial), "[vda]") {
		t.Errorf("the kernel never named the disk vda; serial log:\n%s", lastLines(serial, 30))
	}
	if !strings.Contains(string(serial), "ip="+guestIP) {
		t.Errorf("agent ready line lacks ip=%s", guestIP)
	}

	// Real traffic over the own tap: TCP echo.
	var conn net.Conn
	waitFor(t, "the guest's echo server", 60*time.Second, func() (bool, error) {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(guestIP, fmt.Sprint(echoPort)), 2*time.Second)
		if err != nil {
			return false, nil
		}
		conn = c
		return true, nil
	})
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	msg := "hostd-xen-devices-" + suffix + "\n"
	if _, err := conn.Write([]byte(msg)); err != nil {
		t.Fatalf("echo write: %v", err)
	}
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || got != msg {
		t.Fatalf("echo: got %q, %v; want %q", got, err, msg)
	}

	if err := d.Destroy(ctx, name); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if _, err := net.InterfaceByName(ownTap); err != nil {
		t.Errorf("libvirt removed the tap it did not make: %v", err)
	}
	waitFor(t, "libvirt to remove its tap", 10*time.Second, func() (bool, error) {
		_, err := net.InterfaceByName(libvirtTap)
		return err != nil, nil
	})
}

// TestForeignDomain: domains hostd did not make are listed, without a spec.
func TestForeignDomain(t *testing.T) {
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name := uniqueName(t)
	cleanupDomain(t, d, name)
	doc, err := (&libvirtxml.Domain{
		Type:   "qemu",
		Name:   name,
		Memory: &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		OS:     &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Arch: "x86_64", Type: "hvm"}},
	}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	err = d.call(ctx, "define foreign domain", func(conn *golibvirt.Connect) error {
		dom, err := conn.DomainDefineXML(doc)
		if err != nil {
			return err
		}
		return dom.Free()
	})
	if err != nil {
		t.Fatal(err)
	}
	info, err := d.Domain(ctx, name)
	if err != nil {
		t.Fatalf("Domain: %v", err)
	}
	if info.Spec != nil || info.State != xen.StateShutoff || info.MemoryMiB != 64 || !info.Persistent || info.UUID == "" {
		t.Fatalf("foreign domain: %+v", info)
	}
	list, err := d.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, di := range list {
		if di.Name == name {
			return
		}
	}
	t.Fatalf("List lacks foreign domain %s", name)
}

func liveXML(t *testing.T, d *Driver, ctx context.Context, name string) *libvirtxml.Domain {
	t.Helper()
	var doc string
	err := d.withDomain(ctx, "dump", name, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		var err error
		doc, err = dom.GetXMLDesc(0)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	return &x
}
