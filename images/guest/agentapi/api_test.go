package agentapi

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestDecodeRequest(t *testing.T) {
	good := []struct {
		line string
		cmd  string
		args any
	}{
		{`{"id":1,"cmd":"ping"}`, CmdPing, nil},
		{`{"id":2,"cmd":"stats","args":{}}`, CmdStats, nil},
		{`{"id":3,"cmd":"meminfo","args":null}`, CmdMemInfo, nil},
		{`{"id":4,"cmd":"dirty","args":{"region":"a","size_mib":16,"rate_mib_s":8,"seed":18446744073709551615,"passes":2}}`,
			CmdDirty, DirtyArgs{Region: "a", SizeMiB: 16, RateMiBs: 8, Seed: 1<<64 - 1, Passes: 2}},
		{`{"id":5,"cmd":"stop","args":{"region":"x.y-z_1"}}`, CmdStop, RegionArgs{Region: "x.y-z_1"}},
		{`{"id":6,"cmd":"checksum","args":{"region":"a"}}`, CmdChecksum, RegionArgs{Region: "a"}},
		{`{"id":7,"cmd":"ops","args":{"region":"a"}}`, CmdOps, RegionArgs{Region: "a"}},
		{`{"id":8,"cmd":"echo","args":{"action":"start","port":7}}`, CmdEcho, EchoArgs{Action: "start", Port: 7}},
		{`{"id":9,"cmd":"echo","args":{"action":"stop"}}`, CmdEcho, EchoArgs{Action: "stop"}},
		{`{"id":10,"cmd":"expected","args":{"size_mib":2,"seed":3,"passes_done":4,"page_in_pass":511}}`, CmdExpected,
			ExpectedArgs{SizeMiB: 2, Seed: 3, PassesDone: 4, PageInPass: 511}},
		{`{"id":11,"cmd":"probe","args":{"addr":"10.0.0.2:7","proto":"udp","count":20,"interval_ms":10,"timeout_ms":1000,"size":1422}}`, CmdProbe,
			ProbeArgs{Addr: "10.0.0.2:7", Proto: "udp", Count: 20, IntervalMS: 10, TimeoutMS: 1000, Size: 1422}},
		{`{"id":12,"cmd":"probe","args":{"addr":"[fd00::2]:7","proto":"tcp","count":1,"timeout_ms":30000,"size":1048576}}`, CmdProbe,
			ProbeArgs{Addr: "[fd00::2]:7", Proto: "tcp", Count: 1, TimeoutMS: 30000, Size: 1 << 20}},
	}
	for _, g := range good {
		req, args, err := DecodeRequest([]byte(g.line))
		if err != nil {
			t.Errorf("DecodeRequest(%s): %v", g.line, err)
			continue
		}
		if req.Cmd != g.cmd || args != g.args {
			t.Errorf("DecodeRequest(%s) = %q %#v, want %q %#v", g.line, req.Cmd, args, g.cmd, g.args)
		}
	}

	bad := []struct {
		line   string
		id     uint64
		reason string // a fragment the error must contain
	}{
		{`garbage`, 0, "decode request"},
		{`{"id":1}`, 1, "missing cmd"},
		{`{"id":2,"cmd":"reboot"}`, 2, `unknown command "reboot"`},
		{`{"id":3,"cmd":"ping","args":{"x":1}}`, 3, "takes no args"},
		{`{"id":4,"cmd":"dirty"}`, 4, "missing args"},
		{`{"id":5,"cmd":"dirty","args":{"region":"a","size_mib":0}}`, 5, "size_mib 0"},
		{`{"id":6,"cmd":"dirty","args":{"region":"a","size_mib":1,"sizemib":2}}`, 6, "unknown field"},
		{`{"id":7,"cmd":"dirty","args":{"region":"a b","size_mib":1}}`, 7, "region"},
		{`{"id":8,"cmd":"dirty","args":{"region":"a","size_mib":-1}}`, 8, "dirty args"},
		{`{"id":9,"cmd":"stop","args":{}}`, 9, "region"},
		{`{"id":10,"cmd":"echo","args":{"action":"start"}}`, 10, "port"},
		{`{"id":11,"cmd":"echo","args":{"action":"restart","port":1}}`, 11, "neither start nor stop"},
		{`{"id":12,"cmd":"echo","args":{"action":"start","port":70000}}`, 12, "echo args"},
		{`{"id":13,"cmd":"ping"} {"id":14}`, 0, "trailing data"},
		{`{"id":15,"cmd":"ping","extra":true}`, 0, "unknown field"},
		{`{"id":16,"cmd":"dirty","args":{"region":"a","size_mib":1,"rate_mib_s":99999999}}`, 16, "rate_mib_s"},
		{`{"id":17,"cmd":"dirty","args":{"region":"a","size_mib":99999999}}`, 17, "size_mib"},
		{`{"id":18,"cmd":"dirty","args":[1]}`, 18, "dirty args"},
		{`{"id":19,"cmd":"expected","args":{"size_mib":1,"page_in_pass":256}}`, 19, "page_in_pass 256"},
		{`{"id":20,"cmd":"expected","args":{"seed":1}}`, 20, "size_mib 0"},
		{`{"id":21,"cmd":"probe"}`, 21, "missing args"},
		{probeLine(`"addr":"10.0.0.2"`), 22, "not ip:port"},
		{probeLine(`"addr":"guest-b:7"`), 22, "not ip:port"},
		{probeLine(`"addr":"10.0.0.2:0"`), 22, "port 1-65535"},
		{probeLine(`"addr":"0.0.0.0:7"`), 22, "unicast"},
		{probeLine(`"addr":"224.0.0.1:7"`), 22, "unicast"},
		{probeLine(`"addr":"[fe80::1%eth0]:7"`), 22, "no zone"},
		{probeLine(`"proto":"sctp"`), 22, `proto "sctp"`},
		{probeLine(`"count":0`), 22, "count 0"},
		{probeLine(`"count":10001`), 22, "count 10001"},
		{probeLine(`"interval_ms":10001`), 22, "interval_ms 10001"},
		{probeLine(`"timeout_ms":0`), 22, "timeout_ms 0"},
		{probeLine(`"timeout_ms":30001`), 22, "timeout_ms 30001"},
		{probeLine(`"size":15`), 22, "size 15 not in [16, 65507] for udp"},
		{probeLine(`"size":65508`), 22, "size 65508"},
		{probeLine(`"proto":"tcp","size":1048577`), 22, "size 1048577 not in [16, 1048576] for tcp"},
		{probeLine(`"count":10000,"interval_ms":30,"timeout_ms":1000`), 22, "exceeds 300000 ms"},
		{probeLine(`"count":-1`), 22, "probe args"},
		{probeLine(`"cnt":1`), 22, "unknown field"},
	}
	for _, b := range bad {
		req, _, err := DecodeRequest([]byte(b.line))
		if err == nil {
			t.Errorf("DecodeRequest(%s): no error", b.line)
			continue
		}
		if !errors.Is(err, ErrBadRequest) {
			t.Errorf("DecodeRequest(%s): %v does not wrap ErrBadRequest", b.line, err)
		}
		if !strings.Contains(err.Error(), b.reason) {
			t.Errorf("DecodeRequest(%s): error %q does not mention %q", b.line, err, b.reason)
		}
		if b.id != 0 && req.ID != b.id {
			t.Errorf("DecodeRequest(%s): id %d, want %d to echo back", b.line, req.ID, b.id)
		}
	}

	long := `{"id":1,"cmd":"ping","args":"` + strings.Repeat("x", MaxLineBytes) + `"}`
	if _, _, err := DecodeRequest([]byte(long)); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Errorf("overlong line: got %v, want a length error", err)
	}
}

// probeLine is request 22, a valid UDP probe with some fields overridden
// (JSON keeps the last of duplicate keys).
func probeLine(override string) string {
	return `{"id":22,"cmd":"probe","args":{"addr":"10.0.0.2:7","proto":"udp","count":5,"interval_ms":10,"timeout_ms":500,"size":64,` + override + `}}`
}

func TestParseCompact(t *testing.T) {
	req, args, err := ParseCompact("dirty,region=boot,size_mib=8,seed=1,passes=0,rate_mib_s=4")
	if err != nil {
		t.Fatal(err)
	}
	want := DirtyArgs{Region: "boot", SizeMiB: 8, Seed: 1, RateMiBs: 4}
	if req.Cmd != CmdDirty || args != want {
		t.Errorf("got %q %#v, want dirty %#v", req.Cmd, args, want)
	}
	if _, args, err := ParseCompact("echo,action=start,port=7"); err != nil || args != (EchoArgs{Action: "start", Port: 7}) {
		t.Errorf("echo: %#v %v", args, err)
	}
	if _, args, err := ParseCompact("stop,region=123"); err != nil || args != (RegionArgs{Region: "123"}) {
		t.Errorf("numeric region: %#v %v", args, err)
	}
	if _, args, err := ParseCompact("probe,addr=10.0.0.2:7,proto=tcp,count=3,timeout_ms=500,size=64"); err != nil ||
		args != (ProbeArgs{Addr: "10.0.0.2:7", Proto: "tcp", Count: 3, TimeoutMS: 500, Size: 64}) {
		t.Errorf("probe: %#v %v", args, err)
	}
	if _, _, err := ParseCompact("ping"); err != nil {
		t.Errorf("ping: %v", err)
	}
	for _, s := range []string{"", "dirty,region", "dirty,region=a,region=b,size_mib=1", "dirty,=1", "dirty,region=a,size_mib=x", "nope,a=1"} {
		if _, _, err := ParseCompact(s); err == nil || !errors.Is(err, ErrBadRequest) {
			t.Errorf("ParseCompact(%q): %v, want a bad-request error", s, err)
		}
	}
}

func TestParseBootOptions(t *testing.T) {
	o, err := ParseBootOptions("console=ttyS0 quiet hostd.ip=10.0.2.15/24 hostd.echo=7 hostd.run=ping hostd.run=dirty,region=a,size_mib=1\n")
	if err != nil {
		t.Fatal(err)
	}
	if o.IP != "10.0.2.15/24" || o.Echo != 7 || len(o.Run) != 2 || o.Run[1] != "dirty,region=a,size_mib=1" {
		t.Errorf("got %+v", o)
	}
	for _, s := range []string{"hostd.echo=0", "hostd.echo=x", "hostd.echo=70000", "hostd.bogus=1"} {
		if _, err := ParseBootOptions(s); err == nil {
			t.Errorf("ParseBootOptions(%q): no error", s)
		}
	}
}

func TestParseReady(t *testing.T) {
	r, err := ParseReady("[    3.1] noise HOSTD-AGENT READY uptime_ms=2345 kernel=6.1.0-56-cloud-amd64 port=/dev/vport0p1\r")
	if err != nil {
		t.Fatal(err)
	}
	if r.UptimeMS != 2345 || r.Kernel != "6.1.0-56-cloud-amd64" || r.Fields["port"] != "/dev/vport0p1" {
		t.Errorf("got %+v", r)
	}
	for _, s := range []string{"nothing", ReadyPrefix + " kernel=x", ReadyPrefix + " uptime_ms=1", ReadyPrefix + " uptime_ms=z kernel=x", ReadyPrefix + " junk"} {
		if _, err := ParseReady(s); err == nil {
			t.Errorf("ParseReady(%q): no error", s)
		}
	}
}

// referencePage is the documented formula, written out plainly, to check
// FillPage against the package doc rather than against itself.
func referencePage(seed, pass, page uint64) []byte {
	state := seed*0x9E3779B97F4A7C15 ^ (pass+1)*0xBF58476D1CE4E5B9 ^ (page+1)*0x94D049BB133111EB
	out := make([]byte, 0, PageSize)
	for k := 0; k < PageSize/8; k++ {
		state += 0x9E3779B97F4A7C15
		z := state
		z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
		z = (z ^ (z >> 27)) * 0x94D049BB133111EB
		out = binary.LittleEndian.AppendUint64(out, z^(z>>31))
	}
	return out
}

func TestFillPageMatchesDocumentedFormula(t *testing.T) {
	buf := make([]byte, PageSize)
	seen := map[[32]byte]bool{}
	for _, c := range [][3]uint64{{0, 0, 0}, {1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {42, 3, 255}, {1<<64 - 1, 7, 1 << 20}} {
		FillPage(buf, c[0], c[1], c[2])
		if string(buf) != string(referencePage(c[0], c[1], c[2])) {
			t.Errorf("FillPage%v differs from the documented formula", c)
		}
		h := sha256.Sum256(buf)
		if seen[h] {
			t.Errorf("FillPage%v repeats another page's contents", c)
		}
		seen[h] = true
	}
}

// TestExpectedChecksumSimulatesWriter replays a writer page by page over a
// small region and checks ExpectedChecksum at every position.
func TestExpectedChecksumSimulatesWriter(t *testing.T) {
	const sizeMiB, seed = 1, 99
	pages := uint64(sizeMiB * PagesPerMiB)
	region := make([]byte, pages*PageSize)
	check := func(p, k uint64) {
		t.Helper()
		want := sha256.Sum256(region)
		got, err := ExpectedChecksum(sizeMiB, seed, p, k)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("ExpectedChecksum(passes=%d, page=%d) does not match the simulated region", p, k)
		}
	}
	check(0, 0)
	for pass := uint64(0); pass < 2; pass++ {
		for i := uint64(0); i < pages; i++ {
			copy(region[i*PageSize:], referencePage(seed, pass, i))
			// Checking every page would hash 256 MiB; a spread of
			// positions covers both halves of the formula.
			if i == 0 || i == pages/3 || i == pages-2 {
				check(pass, i+1)
			}
		}
		check(pass+1, 0)
	}
	if _, err := ExpectedChecksum(sizeMiB, seed, 1, pages); err == nil {
		t.Error("page_in_pass == pages: no error")
	}
	if _, err := ExpectedChecksum(0, seed, 0, 0); err == nil {
		t.Error("size 0: no error")
	}
}
