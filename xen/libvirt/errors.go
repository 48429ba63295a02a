package libvirt

import (
	"errors"
	"fmt"

	golibvirt "libvirt.org/go/libvirt"

	"hostd/xen"
)

// wrapErr turns an error from a libvirt call into one that names the
// operation and wraps the matching xen sentinel, so callers can use
// errors.Is without knowing libvirt. The libvirt error stays in the chain.
func wrapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	var lverr golibvirt.Error
	if !errors.As(err, &lverr) {
		return fmt.Errorf("%s: %w", op, err)
	}
	hint, sentinel := classify(lverr)
	return &opError{op: op, sentinel: sentinel, hint: hint, err: err, msg: lverr.Message}
}

// opError is a failed libvirt call: "op: sentinel: libvirt's message
// (hint)". It unwraps to both the sentinel and the libvirt error.
type opError struct {
	op       string
	sentinel error // nil when libvirt's error maps to none
	hint     string
	err      error // the chain holding the golibvirt.Error
	msg      string
}

func (e *opError) Error() string {
	if e.sentinel == nil {
		return e.op + ": " + e.msg
	}
	return e.op + ": " + e.sentinel.Error() + ": " + e.msg + " (" + e.hint + ")"
}

func (e *opError) Unwrap() []error {
	if e.sentinel == nil {
		return []error{e.err}
	}
	return []error{e.sentinel, e.err}
}

// classify maps a libvirt error to a xen sentinel and a hint on what to do.
func classify(e golibvirt.Error) (hint string, sentinel error) {
	switch {
	case isConnError(e):
		return "libvirtd is unreachable; check that it runs, the call can be retried", xen.ErrUnavailable
	case e.Code == golibvirt.ERR_NO_DOMAIN:
		return "check the name, or define the domain first", xen.ErrNotFound
	case e.Code == golibvirt.ERR_DOM_EXIST:
		return "pick another name or undefine the old domain", xen.ErrExists
	case e.Code == golibvirt.ERR_OPERATION_INVALID:
		return "read the domain's state and retry the operation that fits it", xen.ErrState
	}
	return "", nil
}

// isConnError reports whether err means the connection to libvirtd is gone
// (daemon stopped, restarted or unreachable), as opposed to a refusal by a
// live daemon.
func isConnError(err error) bool {
	var e golibvirt.Error
	if !errors.As(err, &e) {
		return false
	}
	switch e.Code {
	case golibvirt.ERR_NO_CONNECT, golibvirt.ERR_INVALID_CONN:
		return true
	case golibvirt.ERR_RPC, golibvirt.ERR_SYSTEM_ERROR, golibvirt.ERR_INTERNAL_ERROR:
		// The same codes come from the hypervisor driver for unrelated
		// failures; only the RPC layer's ones mean a lost connection.
		return e.Domain == golibvirt.FROM_RPC || e.Domain == golibvirt.FROM_REMOTE
	}
	return false
}

// libvirtCode returns the libvirt error number in err's chain, or 0.
func libvirtCode(err error) golibvirt.ErrorNumber {
	var e golibvirt.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}
