package valid

import (
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"hostd/checkpoint/wire"
	"hostd/hostd/errdefs"
)

// Errors, all of class errdefs.ErrInvalid.
var (
	ErrName    = errdefs.New(errdefs.ErrInvalid, "invalid_name", "invalid name")
	ErrAddress = errdefs.New(errdefs.ErrInvalid, "invalid_address", "invalid address")
	// ErrRequest is any other field a request cannot have.
	ErrRequest = errdefs.New(errdefs.ErrInvalid, "invalid_request", "invalid request")
)

// MaxVMName is the longest VM name: a DNS label, which also keeps the
// sockets named after VMs under the 107-byte limit of unix socket paths.
const MaxVMName = 63

// SlotPrefix starts the domain name of every warm slot. '.' is not allowed
// in VM names, so a slot's domain can never be a VM's.
const SlotPrefix = "slot."

var (
	vmNameRE   = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)
	slotNameRE = regexp.MustCompile(`^slot\.[0-9]{1,9}m\.[0-9]{1,4}c\.[a-z0-9]{1,32}$`)
)

// VMName checks a VM's name: 1-63 characters of a-z, 0-9 and '-', not
// starting or ending with '-' (a DNS label: it names a domain, a directory
// and sockets).
func VMName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: a VM name is required", ErrName)
	}
	if len(name) > MaxVMName || !vmNameRE.MatchString(name) {
		return fmt.Errorf("%w: VM name %s must be 1-%d characters of a-z, 0-9 and '-', not starting or ending with '-'", ErrName, quote(name), MaxVMName)
	}
	return nil
}

// DomainName checks the name of a domain hostd runs: a VM's name or a warm
// slot's (slot.<mib>m.<vcpus>c.<id>). It names the domain's directory.
func DomainName(name string) error {
	if strings.HasPrefix(name, SlotPrefix) {
		if !slotNameRE.MatchString(name) {
			return fmt.Errorf("%w: warm slot name %s is not slot.<mib>m.<vcpus>c.<id>", ErrName, quote(name))
		}
		return nil
	}
	return VMName(name)
}

// BackupID checks a VM's id at a backup (what a restore names): the
// backup's own rule, checked here so that a request with a bad id is
// refused before it becomes a job.
func BackupID(id string) error {
	if err := wire.ValidVMID(id); err != nil {
		return fmt.Errorf("%w: backup id %s must be 1-%d characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'", ErrName, quote(id), wire.MaxVMID)
	}
	return nil
}

// HostPort checks a peer's address (field names it in the message): a
// non-empty host and a port from 1 to 65535.
func HostPort(field, addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: %s %s is not host:port (%v)", ErrAddress, field, quote(addr), err)
	}
	if host == "" || strings.ContainsAny(host, "\x00/ ") {
		return fmt.Errorf("%w: %s %s has no usable host", ErrAddress, field, quote(addr))
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return fmt.Errorf("%w: %s %s: port must be a number from 1 to 65535", ErrAddress, field, quote(addr))
	}
	return nil
}

// Within returns dir/name after checking that name is one path element:
// not empty, not "." or "..", without a separator or a NUL. What it
// returns is always directly inside dir.
func Within(dir, name string) (string, error) {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return "", fmt.Errorf("%w: %s is not a plain file name inside %s", ErrName, quote(name), dir)
	}
	p := filepath.Join(dir, name)
	if filepath.Dir(p) != filepath.Clean(dir) {
		return "", fmt.Errorf("%w: %s leaves %s", ErrName, quote(name), dir)
	}
	return p, nil
}

// quote shows a name in a message, cut short: a 1 MiB name is not echoed.
func quote(s string) string {
	const max = 80
	if len(s) > max {
		return strconv.Quote(s[:max]) + "..."
	}
	return strconv.Quote(s)
}
