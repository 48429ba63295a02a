package libvirt

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"hostd/xen"
)

// renderAndParse renders spec and parses the XML back, so the assertions
// are on what libvirt will read, not on our structs.
func renderAndParse(t *testing.T, s xen.DomainSpec, o xmlOptions) (xen.DomainSpec, *libvirtxml.Domain) {
	t.Helper()
	n, err := normalize(s)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := domainXML(n, o)
	if err != nil {
		t.Fatalf("domainXML: %v", err)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(doc); err != nil {
		t.Fatalf("parse back: %v\n%s", err, doc)
	}
	return n, &dom
}

func TestDomainXMLKernelBoot(t *testing.T) {
	s, dir := specFixture(t)
	s.Disks = append(s.Disks,
		xen.Disk{NBDSocket: dir + "/nbd.sock", NBDExport: "swap", Target: "vdc"},
		xen.Disk{Path: "/dev/loop7", ReadOnly: true, Format: "qcow2"})
	s.NICs = append(s.NICs, xen.NIC{Tap: "owned0"})
	n, dom := renderAndParse(t, s, xmlOptions{
		DomainType:         "qemu",
		BalloonStatsPeriod: 5,
		TapExists:          func(name string) bool { return name == "tapx0" },
	})

	if dom.Type != "qemu" || dom.Name != s.Name || dom.UUID != n.UUID {
		t.Errorf("identity: type %q name %q uuid %q", dom.Type, dom.Name, dom.UUID)
	}
	if dom.Memory.Value != 256*1024 || dom.Memory.Unit != "KiB" || dom.CurrentMemory.Value != 256*1024 || dom.VCPU.Value != 1 {
		t.Errorf("size: memory %+v current %+v vcpu %+v", dom.Memory, dom.CurrentMemory, dom.VCPU)
	}
	if dom.MemoryBacking != nil {
		t.Errorf("memoryBacking must stay unset (RAM is a -object of our own): %+v", dom.MemoryBacking)
	}
	if dom.CPU != nil {
		t.Errorf("tcg: cpu %+v, want default", dom.CPU)
	}
	os := dom.OS
	if os.Kernel != s.Kernel || os.Initrd != s.Initrd || os.Cmdline != s.Cmdline || len(os.BootDevices) != 0 {
		t.Errorf("os: %+v", os)
	}
	if dom.Features == nil || dom.Features.ACPI == nil {
		t.Error("acpi feature missing: Shutdown needs it")
	}

	dev := dom.Devices
	if len(dev.Disks) != 3 {
		t.Fatalf("disks: %d", len(dev.Disks))
	}
	d0, d1, d2 := dev.Disks[0], dev.Disks[1], dev.Disks[2]
	if d0.Source.File == nil || d0.Source.File.File != s.Disks[0].Path || d0.Target.Dev != "vda" || d0.Target.Bus != "virtio" ||
		d0.Driver.Type != "raw" || d0.ReadOnly != nil {
		t.Errorf("file disk: %+v source %+v target %+v driver %+v", d0, d0.Source, d0.Target, d0.Driver)
	}
	if nw := d1.Source.Network; nw == nil || nw.Protocol != "nbd" || nw.Name != "swap" || len(nw.Hosts) != 1 ||
		nw.Hosts[0].Transport != "unix" || nw.Hosts[0].Socket != dir+"/nbd.sock" || d1.Target.Dev != "vdc" {
		t.Errorf("nbd disk: source %+v target %+v", d1.Source.Network, d1.Target)
	}
	if d2.Source.Block == nil || d2.Source.Block.Dev != "/dev/loop7" || d2.ReadOnly == nil || d2.Driver.Type != "qcow2" || d2.Target.Dev != "vdb" {
		t.Errorf("block disk: %+v source %+v", d2, d2.Source)
	}

	if len(dev.Interfaces) != 2 {
		t.Fatalf("interfaces: %d", len(dev.Interfaces))
	}
	i0, i1 := dev.Interfaces[0], dev.Interfaces[1]
	if i0.Source == nil || i0.Source.Ethernet == nil || i0.Target.Dev != "tapx0" || i0.Target.Managed != "no" ||
		i0.MAC.Address != "52:54:00:aa:bb:cc" || i0.MTU == nil || i0.MTU.Size != 1500 || i0.Model.Type != "virtio" {
		t.Errorf("existing tap: %+v target %+v", i0, i0.Target)
	}
	if i1.Source == nil || i1.Source.Ethernet == nil || i1.Target.Dev != "owned0" || i1.Target.Managed != "" ||
		i1.MAC.Address != n.NICs[1].MAC || i1.MTU != nil {
		t.Errorf("libvirt-made tap: %+v target %+v", i1, i1.Target)
	}

	if len(dev.Serials) != 1 || dev.Serials[0].Source.File == nil || dev.Serials[0].Source.File.Path != s.SerialLog ||
		dev.Serials[0].Source.File.Append != "on" {
		t.Errorf("serial: %+v", dev.Serials)
	}
	if len(dev.Consoles) != 1 || dev.Consoles[0].Target.Type != "serial" || dev.Consoles[0].Source.File.Path != s.SerialLog {
		t.Errorf("console: %+v", dev.Consoles)
	}
	if len(dev.Channels) != 1 {
		t.Fatalf("channels: %+v", dev.Channels)
	}
	ch := dev.Channels[0]
	if ch.Source.UNIX == nil || ch.Source.UNIX.Mode != "bind" || ch.Source.UNIX.Path != s.AgentSocket ||
		ch.Target.VirtIO == nil || ch.Target.VirtIO.Name != xen.AgentChannel {
		t.Errorf("agent channel: source %+v target %+v", ch.Source.UNIX, ch.Target.VirtIO)
	}
	if b := dev.MemBalloon; b == nil || b.Model != "virtio" || b.Stats == nil || b.Stats.Period != 5 {
		t.Errorf("balloon: %+v", dev.MemBalloon)
	}

	args := qemuCmdline(t, dom)
	if len(args) != 4 || args[0] != "-object" || args[2] != "-machine" || args[3] != "memory-backend=guestram" {
		t.Fatalf("qemu args: %q", args)
	}
	var obj map[string]any
	if err := json.Unmarshal([]byte(args[1]), &obj); err != nil {
		t.Fatalf("-object %q: %v", args[1], err)
	}
	want := map[string]any{
		"qom-type": "memory-backend-file", "id": "guestram", "mem-path": s.RAMPath, "share": true,
		"size": float64(256 << 20), "x-use-canonical-path-for-ramblock-id": false,
	}
	if !reflect.DeepEqual(obj, want) {
		t.Errorf("-object %v, want %v", obj, want)
	}

	got, err := parseSpecMetadata(dom.Metadata.XML)
	if err != nil {
		t.Fatalf("metadata: %v", err)
	}
	if !reflect.DeepEqual(*got, n) {
		t.Errorf("metadata spec\n%+v\nwant\n%+v", *got, n)
	}
}

func TestDomainXMLDiskBootKVMIncoming(t *testing.T) {
	s, _ := specFixture(t)
	s.Kernel, s.Initrd, s.Cmdline = "", "", ""
	s.SerialLog, s.AgentSocket, s.NICs = "", "", nil
	s.Incoming = true
	_, dom := renderAndParse(t, s, xmlOptions{DomainType: "kvm", BalloonStatsPeriod: 1})
	if dom.Type != "kvm" || dom.CPU == nil || dom.CPU.Mode != "host-passthrough" {
		t.Errorf("kvm: type %q cpu %+v", dom.Type, dom.CPU)
	}
	if dom.OS.Kernel != "" || len(dom.OS.BootDevices) != 1 || dom.OS.BootDevices[0].Dev != "hd" {
		t.Errorf("disk boot: %+v", dom.OS)
	}
	if len(dom.Devices.Serials) != 0 || len(dom.Devices.Channels) != 0 || len(dom.Devices.Interfaces) != 0 {
		t.Errorf("unexpected devices: %+v", dom.Devices)
	}
	args := qemuCmdline(t, dom)
	if len(args) != 6 || args[4] != "-incoming" || args[5] != "defer" {
		t.Errorf("incoming args: %q", args)
	}
}

func TestParseSpecMetadataForms(t *testing.T) {
	s, _ := specFixture(t)
	elem, err := specMetadata(s)
	if err != nil {
		t.Fatal(err)
	}
	// As written, and as libvirt's GetMetadata returns it (no namespace).
	for _, form := range []string{elem, `<spec>` + mustJSON(t, s) + `</spec>`} {
		got, err := parseSpecMetadata(form)
		if err != nil || !reflect.DeepEqual(*got, s) {
			t.Errorf("parse %q: %+v, %v", form, got, err)
		}
	}
	for _, bad := range []string{`<other>{}</other>`, `<spec xmlns="urn:someone-else">{}</spec>`, `<spec>not json</spec>`, `<spec`} {
		if _, err := parseSpecMetadata(bad); err == nil {
			t.Errorf("parse %q: want an error", bad)
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func qemuCmdline(t *testing.T, dom *libvirtxml.Domain) []string {
	t.Helper()
	if dom.QEMUCommandline == nil {
		t.Fatal("no qemu:commandline")
	}
	var out []string
	for _, a := range dom.QEMUCommandline.Args {
		out = append(out, a.Value)
	}
	return out
}

// A hot-plugged swap disk: NBD on a unix socket with QEMU's reconnect
// delay, and the serial the guest finds it by.
func TestDiskXMLNBDReconnectSerial(t *testing.T) {
	d := diskXML(xen.Disk{NBDSocket: "/run/hostd/swap/web.sock", Target: "vdz", Serial: "hostd-swap", NBDReconnectDelay: 30, Format: "raw"})
	x, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`protocol="nbd"`, `socket="/run/hostd/swap/web.sock"`, `<reconnect delay="30"></reconnect>`, `<serial>hostd-swap</serial>`, `dev="vdz"`} {
		if !strings.Contains(x, want) {
			t.Errorf("disk XML lacks %s:\n%s", want, x)
		}
	}
	d2 := diskXML(xen.Disk{NBDSocket: "/s.sock", Target: "vdb"})
	if x2, _ := d2.Marshal(); strings.Contains(x2, "reconnect") || strings.Contains(x2, "serial") {
		t.Errorf("no delay and no serial asked for:\n%s", x2)
	}
}
