package agentclient_test

import (
	"context"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"hostd/images/guest/agentclient"
	"hostd/images/guest/guestimage"
)

// TestGuestEchoOverTapInNetns boots the guest with its NIC on a tap device
// inside a network namespace the test creates, with the echo server
// started from the kernel command line (hostd.echo), and talks to it from
// inside that namespace: a real virtio-net path with no user-mode stack.
func TestGuestEchoOverTapInNetns(t *testing.T) {
	img := guestimage.Require(t)

	// The namespace belongs to this goroutine's thread, which is never
	// unlocked: when the test ends the thread exits, and with QEMU gone
	// the namespace and its tap go with it. QEMU, forked from this thread,
	// starts inside it; sockets opened here are inside it too.
	runtime.LockOSThread()
	ns, err := netns.New()
	if err != nil {
		t.Skipf("cannot create a network namespace (needs root): %v", err)
	}
	defer ns.Close()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	// Single queue, no packet info, virtio-net headers: what QEMU asks for
	// when it attaches to an existing tap.
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "hostdtap0"}, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR}
	if err := netlink.LinkAdd(tap); err != nil {
		t.Fatalf("create tap: %v", err)
	}
	addr, _ := netlink.ParseAddr("10.77.0.1/24")
	if err := netlink.AddrAdd(tap, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		t.Fatal(err)
	}

	vm := bootVM(t, img, "hostd.ip=10.77.0.2/24 hostd.echo=7",
		"-netdev", "tap,id=n0,ifname=hostdtap0,script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	ready, err := agentclient.WaitReady(ctx, vm.serial)
	if err != nil {
		t.Fatal(err)
	}
	if ready.Fields["ip"] != "10.77.0.2/24" || ready.Fields["boot_errors"] != "0" {
		t.Fatalf("ready line %v", ready.Fields)
	}
	c, err := agentclient.Dial(ctx, vm.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.Stats(ctx)
	if err != nil || st.EchoPort != 7 {
		t.Fatalf("stats after hostd.echo=7: %+v %v", st, err)
	}

	// The guest answers ARP once its link is up; the first connection may
	// need a retry while that settles (bounded).
	var conn net.Conn
	for try := 0; try < 20 && conn == nil; try++ {
		conn, err = net.DialTimeout("tcp", "10.77.0.2:7", 3*time.Second)
	}
	if conn == nil {
		t.Fatalf("connect to the guest's echo server on the tap: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	msg := make([]byte, 64*1024) // several segments through virtio-net
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	go conn.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != string(msg) {
		t.Fatalf("tcp echo of %d bytes: %v (equal: %v)", len(msg), err, string(got) == string(msg))
	}

	u, err := net.Dial("udp", "10.77.0.2:7")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	var reply string
	for try := 0; try < 10 && reply == ""; try++ {
		if _, err := u.Write([]byte("datagram over the tap")); err != nil {
			t.Fatal(err)
		}
		_ = u.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, 64)
		if n, err := u.Read(b); err == nil {
			reply = string(b[:n])
		}
	}
	if reply != "datagram over the tap" {
		t.Fatalf("udp echo over the tap: got %q", reply)
	}
}
