package valid

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestNamesThatCouldLeaveADirectoryAreRefused(t *testing.T) {
	bad := []string{"", ".", "..", "../x", "../../etc", "a/b", "/abs", "a\x00b", "A", "a_b", "-a", "a-", "a.b",
		strings.Repeat("a", 64), strings.Repeat("a", 300), "slot.", "slot.1m.1c.", "slot.1m.1c.x/..", "slot.../x"}
	for _, n := range bad {
		if err := DomainName(n); !errors.Is(err, ErrName) {
			t.Errorf("DomainName(%q) = %v, want ErrName", n, err)
		}
	}
	for _, n := range []string{"a", "web-1", strings.Repeat("a", 63), "slot.256m.1c.0a1b"} {
		if err := DomainName(n); err != nil {
			t.Errorf("DomainName(%q) = %v", n, err)
		}
	}
	if err := VMName("slot.256m.1c.0a1b"); err == nil {
		t.Error("a slot's domain name passed as a VM name")
	}
}

func TestBackupIDs(t *testing.T) {
	for _, id := range []string{"", "..", ".hidden", "a/b", "a\x00", strings.Repeat("x", 300)} {
		if err := BackupID(id); !errors.Is(err, ErrName) {
			t.Errorf("BackupID(%q) = %v, want ErrName", id, err)
		}
	}
	for _, id := range []string{"db", "Db_1.v2", "a..b"} {
		if err := BackupID(id); err != nil {
			t.Errorf("BackupID(%q) = %v", id, err)
		}
	}
}

func TestHostPort(t *testing.T) {
	for _, a := range []string{"", "host", ":7443", "h:0", "h:99999", "h:-1", "h:x", "a b:1", "h:1:2"} {
		if err := HostPort("backup", a); !errors.Is(err, ErrAddress) {
			t.Errorf("HostPort(%q) = %v, want ErrAddress", a, err)
		}
	}
	for _, a := range []string{"127.0.0.1:7443", "[::1]:1", "backup.example:65535"} {
		if err := HostPort("backup", a); err != nil {
			t.Errorf("HostPort(%q) = %v", a, err)
		}
	}
}

func TestWithinStaysInside(t *testing.T) {
	dir := "/var/lib/hostd/vms"
	for _, n := range []string{"", ".", "..", "../x", "x/../../y", "a\x00"} {
		if p, err := Within(dir, n); err == nil {
			t.Errorf("Within(%q) = %q, want an error", n, p)
		}
	}
	p, err := Within(dir+"/", "web")
	if err != nil || p != filepath.Join(dir, "web") {
		t.Fatalf("Within = %q, %v", p, err)
	}
}

func TestLongNamesAreCutInMessages(t *testing.T) {
	err := VMName(strings.Repeat("X", 1<<20))
	if err == nil || len(err.Error()) > 400 {
		t.Fatalf("message of %d bytes for a 1 MiB name", len(err.Error()))
	}
}
