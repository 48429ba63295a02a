package libvirt

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"net"
	"strings"

	"libvirt.org/go/libvirtxml"

	"hostd/xen"
)

// MetadataNamespace names hostd's element in a domain's <metadata>: the
// normalised DomainSpec as JSON, so a restarted hostd can adopt the domain.
const MetadataNamespace = "https://hostd.dev/xmlns/libvirt/domain-spec/1"

// ramBackendID is the QOM id of the guest RAM backend. It names the RAM
// block in the migration stream, so the saving and the restoring QEMU must
// agree on it: never change it for existing checkpoints.
const ramBackendID = "guestram"

// specElement is the <hostd:spec> metadata element.
type specElement struct {
	XMLName xml.Name `xml:"spec"`
	NS      string   `xml:"xmlns,attr"`
	JSON    string   `xml:",chardata"`
}

// ramBackend is QEMU's memory-backend-file object in its JSON -object form.
// x-use-canonical-path-for-ramblock-id=false names the RAM block after the
// id alone (not its QOM path), as QEMU's own pc.ram is named.
type ramBackend struct {
	QOMType   string `json:"qom-type"`
	ID        string `json:"id"`
	MemPath   string `json:"mem-path"`
	Share     bool   `json:"share"`
	Size      uint64 `json:"size"`
	Canonical bool   `json:"x-use-canonical-path-for-ramblock-id"`
}

// xmlOptions are the driver-wide inputs of domainXML besides the spec.
type xmlOptions struct {
	DomainType         string // "kvm" or "qemu"
	BalloonStatsPeriod uint   // seconds
	// TapExists says whether a tap is already on the host; libvirt then
	// must not create or delete it (managed='no').
	TapExists func(name string) bool
}

// domainXML renders a normalised, validated spec as libvirt domain XML.
func domainXML(s xen.DomainSpec, o xmlOptions) (string, error) {
	meta, err := specMetadata(s)
	if err != nil {
		return "", err
	}
	kib := uint(s.MemoryMiB * 1024)
	dom := &libvirtxml.Domain{
		Type:          o.DomainType,
		Name:          s.Name,
		UUID:          s.UUID,
		Metadata:      &libvirtxml.DomainMetadata{XML: meta},
		Memory:        &libvirtxml.DomainMemory{Value: kib, Unit: "KiB"},
		CurrentMemory: &libvirtxml.DomainCurrentMemory{Value: kib, Unit: "KiB"},
		VCPU:          &libvirtxml.DomainVCPU{Value: uint(s.VCPUs)},
		OS: &libvirtxml.DomainOS{
			Type: &libvirtxml.DomainOSType{Arch: "x86_64", Type: "hvm"},
		},
		// ACPI is how Shutdown asks the guest to power off.
		Features: &libvirtxml.DomainFeatureList{
			ACPI: &libvirtxml.DomainFeature{},
			APIC: &libvirtxml.DomainFeatureAPIC{},
		},
		Clock:      &libvirtxml.DomainClock{Offset: "utc"},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		OnCrash:    "destroy",
		Devices:    &libvirtxml.DomainDeviceList{},
	}
	if o.DomainType == "kvm" {
		dom.CPU = &libvirtxml.DomainCPU{Mode: "host-passthrough"}
	}
	if s.Kernel != "" {
		dom.OS.Kernel = s.Kernel
		dom.OS.Initrd = s.Initrd
		dom.OS.Cmdline = s.Cmdline
	} else {
		dom.OS.BootDevices = []libvirtxml.DomainBootDevice{{Dev: "hd"}}
	}

	dev := dom.Devices
	// No USB controller: libvirt adds one (and a tablet) by default, and
	// it is device state to migrate for nothing.
	zero := uint(0)
	dev.Controllers = append(dev.Controllers, libvirtxml.DomainController{Type: "usb", Index: &zero, Model: "none"})
	for _, dk := range s.Disks {
		dev.Disks = append(dev.Disks, diskXML(dk))
	}
	for _, n := range s.NICs {
		dev.Interfaces = append(dev.Interfaces, nicXML(n, o.TapExists != nil && o.TapExists(n.Tap)))
	}
	if s.SerialLog != "" {
		port := uint(0)
		src := &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: s.SerialLog, Append: "on"}}
		dev.Serials = []libvirtxml.DomainSerial{{Source: src, Target: &libvirtxml.DomainSerialTarget{Port: &port}}}
		dev.Consoles = []libvirtxml.DomainConsole{{Source: src, Target: &libvirtxml.DomainConsoleTarget{Type: "serial", Port: &port}}}
	}
	if s.AgentSocket != "" {
		dev.Channels = []libvirtxml.DomainChannel{{
			Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind", Path: s.AgentSocket}},
			Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: xen.AgentChannel}},
		}}
	}
	dev.MemBalloon = &libvirtxml.DomainMemBalloon{
		Model: "virtio",
		Stats: &libvirtxml.DomainMemBalloonStats{Period: o.BalloonStatsPeriod},
	}

	args, err := qemuArgs(s)
	if err != nil {
		return "", err
	}
	dom.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{}
	for _, a := range args {
		dom.QEMUCommandline.Args = append(dom.QEMUCommandline.Args, libvirtxml.DomainQEMUCommandlineArg{Value: a})
	}
	out, err := dom.Marshal()
	if err != nil {
		return "", fmt.Errorf("render domain xml: %w", err)
	}
	return out, nil
}

// qemuArgs are the arguments libvirt passes through to QEMU: guest RAM as a
// shared file at a path hostd chooses (libvirt's own file backing names the
// file after the run id, which a restore cannot know), and for a restore the
// deferred incoming migration.
func qemuArgs(s xen.DomainSpec) ([]string, error) {
	obj, err := json.Marshal(ramBackend{
		QOMType: "memory-backend-file",
		ID:      ramBackendID,
		MemPath: s.RAMPath,
		Share:   true,
		Size:    s.MemoryMiB << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("render ram backend: %w", err)
	}
	// No mem-lock (-overcommit mem-lock=on, <memoryBacking><locked/>): it
	// would fault in the whole RAM file at start, which defeats lazy
	// restore, and where RLIMIT_MEMLOCK cannot be raised (these machines:
	// no CAP_SYS_RESOURCE, 8 MiB) libvirt cannot start such a domain.
	args := []string{"-object", string(obj), "-machine", "memory-backend=" + ramBackendID}
	if s.Incoming {
		args = append(args, "-incoming", "defer")
	}
	return args, nil
}

func diskXML(dk xen.Disk) libvirtxml.DomainDisk {
	d := libvirtxml.DomainDisk{
		Device: "disk",
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: dk.Format},
		Target: &libvirtxml.DomainDiskTarget{Dev: dk.Target, Bus: "virtio"},
	}
	switch {
	case dk.NBDSocket != "":
		d.Source = &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
			Protocol: "nbd",
			Name:     dk.NBDExport,
			Hosts:    []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: dk.NBDSocket}},
		}}
		if dk.NBDReconnectDelay > 0 {
			d.Source.Network.Reconnect = &libvirtxml.DomainDiskSourceNetworkReconnect{Delay: fmt.Sprint(dk.NBDReconnectDelay)}
		}
	case strings.HasPrefix(dk.Path, "/dev/"):
		d.Source = &libvirtxml.DomainDiskSource{Block: &libvirtxml.DomainDiskSourceBlock{Dev: dk.Path}}
	default:
		d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: dk.Path}}
	}
	if dk.ReadOnly {
		d.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	}
	d.Serial = dk.Serial
	return d
}

func nicXML(n xen.NIC, tapExists bool) libvirtxml.DomainInterface {
	i := libvirtxml.DomainInterface{
		Source: &libvirtxml.DomainInterfaceSource{Ethernet: &libvirtxml.DomainInterfaceSourceEthernet{}},
		MAC:    &libvirtxml.DomainInterfaceMAC{Address: n.MAC},
		Target: &libvirtxml.DomainInterfaceTarget{Dev: n.Tap},
		Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
	}
	if tapExists {
		// Someone else (hostd's dataplane) owns the tap: libvirt uses it as
		// is (its MTU too: <mtu> then only sets the guest side) and leaves
		// it in place when the domain stops.
		i.Target.Managed = "no"
	}
	if n.MTU > 0 {
		i.MTU = &libvirtxml.DomainInterfaceMTU{Size: uint(n.MTU)}
	}
	return i
}

func specMetadata(s xen.DomainSpec) (string, error) {
	j, err := json.Marshal(s)
	if err != nil {
		return "", fmt.Errorf("encode spec metadata: %w", err)
	}
	out, err := xml.Marshal(specElement{NS: MetadataNamespace, JSON: string(j)})
	if err != nil {
		return "", fmt.Errorf("encode spec metadata: %w", err)
	}
	return string(out), nil
}

// parseSpecMetadata reads the spec back from the metadata element libvirt
// returns (which may carry a namespace prefix).
func parseSpecMetadata(elem string) (*xen.DomainSpec, error) {
	var e struct {
		XMLName xml.Name
		JSON    string `xml:",chardata"`
	}
	if err := xml.Unmarshal([]byte(elem), &e); err != nil {
		return nil, fmt.Errorf("parse spec metadata: %w", err)
	}
	// libvirt hands the element back without its namespace (it was looked
	// up by it); accept both forms.
	if (e.XMLName.Space != "" && e.XMLName.Space != MetadataNamespace) || e.XMLName.Local != "spec" {
		return nil, fmt.Errorf("parse spec metadata: unexpected element {%s}%s", e.XMLName.Space, e.XMLName.Local)
	}
	var s xen.DomainSpec
	if err := json.Unmarshal([]byte(strings.TrimSpace(e.JSON)), &s); err != nil {
		return nil, fmt.Errorf("parse spec metadata: %w", err)
	}
	return &s, nil
}

// tapExists reports whether a network interface of that name is on this host.
func tapExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}
