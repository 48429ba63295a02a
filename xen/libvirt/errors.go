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
	if sentinel, hint := classify(lverr); sentinel != nil {
		return fmt.Errorf("%s: %w: %s (%s): %w", op, sentinel, lverr.Message, hint, lverr)
	}
	return fmt.Errorf("%s: %s: %w", op, lverr.Message, lverr)
}

// classify maps a libvirt error to a xen sentinel and a hint on what to do.
func classify(e golibvirt.Error) (sentinel error, hint string) {
	switch {
	case isConnError(e):
		return xen.ErrUnavailable, "libvirtd is unreachable; check that it runs, the call can be retried"
	case e.Code == golibvirt.ERR_NO_DOMAIN:
		return xen.ErrNotFound, "check the name, or define the domain first"
	case e.Code == golibvirt.ERR_DOM_EXIST:
		return xen.ErrExists, "pick another name or undefine the old domain"
	case e.Code == golibvirt.ERR_OPERATION_INVALID:
		return xen.ErrState, "read the domain's state and retry the operation that fits it"
	}
	return nil, ""
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
