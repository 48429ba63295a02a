package libvirt

import (
	"errors"
	"strings"
	"testing"

	golibvirt "libvirt.org/go/libvirt"

	"hostd/xen"
)

func TestWrapErrMapsLibvirtErrors(t *testing.T) {
	cases := []struct {
		err  golibvirt.Error
		want error
	}{
		{golibvirt.Error{Code: golibvirt.ERR_NO_DOMAIN, Message: "no domain"}, xen.ErrNotFound},
		{golibvirt.Error{Code: golibvirt.ERR_DOM_EXIST, Message: "exists"}, xen.ErrExists},
		{golibvirt.Error{Code: golibvirt.ERR_OPERATION_INVALID, Message: "not running"}, xen.ErrState},
		{golibvirt.Error{Code: golibvirt.ERR_NO_CONNECT, Domain: golibvirt.FROM_REMOTE, Message: "refused"}, xen.ErrUnavailable},
		{golibvirt.Error{Code: golibvirt.ERR_INVALID_CONN, Message: "closed"}, xen.ErrUnavailable},
		{golibvirt.Error{Code: golibvirt.ERR_INTERNAL_ERROR, Domain: golibvirt.FROM_RPC, Message: "client socket is closed"}, xen.ErrUnavailable},
		{golibvirt.Error{Code: golibvirt.ERR_SYSTEM_ERROR, Domain: golibvirt.FROM_RPC, Message: "eof"}, xen.ErrUnavailable},
		// The same codes from the QEMU driver are not connection trouble.
		{golibvirt.Error{Code: golibvirt.ERR_INTERNAL_ERROR, Domain: golibvirt.FROM_QEMU, Message: "qemu died"}, nil},
		{golibvirt.Error{Code: golibvirt.ERR_OPERATION_FAILED, Domain: golibvirt.FROM_QEMU, Message: "failed"}, nil},
	}
	sentinels := []error{xen.ErrNotFound, xen.ErrExists, xen.ErrState, xen.ErrUnavailable, xen.ErrInvalidSpec}
	for _, c := range cases {
		err := wrapErr(`start domain "x"`, c.err)
		if !strings.HasPrefix(err.Error(), `start domain "x": `) || !strings.Contains(err.Error(), c.err.Message) {
			t.Errorf("%v: message %q lacks the operation or libvirt's message", c.err, err)
		}
		var lv golibvirt.Error
		if !errors.As(err, &lv) || lv.Code != c.err.Code {
			t.Errorf("%v: libvirt error not kept in the chain", c.err)
		}
		for _, s := range sentinels {
			if errors.Is(err, s) != (s == c.want) {
				t.Errorf("%v: errors.Is(%v) = %v, want %v", c.err, s, errors.Is(err, s), s == c.want)
			}
		}
	}
	if wrapErr("x", nil) != nil {
		t.Error("wrapErr(nil) != nil")
	}
	plain := errors.New("plain")
	if err := wrapErr("op", plain); !errors.Is(err, plain) || err.Error() != "op: plain" {
		t.Errorf("plain error: %v", err)
	}
}

func TestDecodeQMPReply(t *testing.T) {
	ret, err := decodeQMPReply("query-status", `{"return":{"running":true,"status":"running"},"id":"libvirt-12"}`)
	if err != nil || string(ret) != `{"running":true,"status":"running"}` {
		t.Errorf("return: %s, %v", ret, err)
	}
	ret, err = decodeQMPReply("cont", `{"return":{},"id":"libvirt-13"}`)
	if err != nil || string(ret) != `{}` {
		t.Errorf("empty return: %s, %v", ret, err)
	}
	_, err = decodeQMPReply("migrate", `{"id":"libvirt-14","error":{"class":"GenericError","desc":"There's a migration process in progress"}}`)
	var me *xen.MonitorError
	if !errors.As(err, &me) || me.Class != "GenericError" || me.Command != "migrate" || !strings.Contains(me.Desc, "in progress") {
		t.Errorf("error reply: %v", err)
	}
	for _, bad := range []string{``, `{`, `{"id":"x"}`} {
		if _, err := decodeQMPReply("x", bad); err == nil {
			t.Errorf("reply %q: want an error", bad)
		}
	}
}

func TestEventNames(t *testing.T) {
	cases := []struct {
		ev            golibvirt.DomainEventType
		detail        int
		name, detail2 string
	}{
		{golibvirt.DOMAIN_EVENT_DEFINED, int(golibvirt.DOMAIN_EVENT_DEFINED_ADDED), xen.EventDefined, "added"},
		{golibvirt.DOMAIN_EVENT_UNDEFINED, int(golibvirt.DOMAIN_EVENT_UNDEFINED_REMOVED), xen.EventUndefined, "removed"},
		{golibvirt.DOMAIN_EVENT_STARTED, int(golibvirt.DOMAIN_EVENT_STARTED_BOOTED), xen.EventStarted, "booted"},
		{golibvirt.DOMAIN_EVENT_STARTED, int(golibvirt.DOMAIN_EVENT_STARTED_WAKEUP), xen.EventStarted, "wakeup"},
		{golibvirt.DOMAIN_EVENT_SUSPENDED, int(golibvirt.DOMAIN_EVENT_SUSPENDED_PAUSED), xen.EventSuspended, "paused"},
		{golibvirt.DOMAIN_EVENT_SUSPENDED, int(golibvirt.DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED), xen.EventSuspended, "postcopy_failed"},
		{golibvirt.DOMAIN_EVENT_RESUMED, int(golibvirt.DOMAIN_EVENT_RESUMED_UNPAUSED), xen.EventResumed, "unpaused"},
		{golibvirt.DOMAIN_EVENT_STOPPED, int(golibvirt.DOMAIN_EVENT_STOPPED_DESTROYED), xen.EventStopped, "destroyed"},
		{golibvirt.DOMAIN_EVENT_STOPPED, int(golibvirt.DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT), xen.EventStopped, "from_snapshot"},
		{golibvirt.DOMAIN_EVENT_SHUTDOWN, int(golibvirt.DOMAIN_EVENT_SHUTDOWN_GUEST), xen.EventShutdown, "guest"},
		{golibvirt.DOMAIN_EVENT_PMSUSPENDED, int(golibvirt.DOMAIN_EVENT_PMSUSPENDED_DISK), xen.EventPMSuspended, "disk"},
		{golibvirt.DOMAIN_EVENT_CRASHED, int(golibvirt.DOMAIN_EVENT_CRASHED_PANICKED), xen.EventCrashed, "panicked"},
		{golibvirt.DOMAIN_EVENT_STOPPED, 99, xen.EventStopped, ""},
	}
	for _, c := range cases {
		name, detail := eventNames(c.ev, c.detail)
		if name != c.name || detail != c.detail2 {
			t.Errorf("eventNames(%d, %d) = %q %q, want %q %q", c.ev, c.detail, name, detail, c.name, c.detail2)
		}
	}
}

func TestStateName(t *testing.T) {
	cases := []struct {
		st     golibvirt.DomainState
		reason int
		state  xen.State
		why    string
	}{
		{golibvirt.DOMAIN_RUNNING, int(golibvirt.DOMAIN_RUNNING_BOOTED), xen.StateRunning, "booted"},
		{golibvirt.DOMAIN_BLOCKED, 0, xen.StateRunning, ""},
		{golibvirt.DOMAIN_PAUSED, int(golibvirt.DOMAIN_PAUSED_STARTING_UP), xen.StatePaused, "starting_up"},
		{golibvirt.DOMAIN_SHUTOFF, int(golibvirt.DOMAIN_SHUTOFF_DESTROYED), xen.StateShutoff, "destroyed"},
		{golibvirt.DOMAIN_SHUTDOWN, int(golibvirt.DOMAIN_SHUTDOWN_USER), xen.StateShutdown, "user"},
		{golibvirt.DOMAIN_CRASHED, int(golibvirt.DOMAIN_CRASHED_PANICKED), xen.StateCrashed, "panicked"},
		{golibvirt.DOMAIN_PAUSED, int(golibvirt.DOMAIN_PAUSED_API_ERROR), xen.StatePaused, "api_error"},
		{golibvirt.DOMAIN_RUNNING, int(golibvirt.DOMAIN_RUNNING_POSTCOPY_FAILED), xen.StateRunning, "postcopy_failed"},
		{golibvirt.DOMAIN_SHUTOFF, int(golibvirt.DOMAIN_SHUTOFF_DAEMON), xen.StateShutoff, "daemon"},
		{golibvirt.DOMAIN_PMSUSPENDED, 0, xen.StatePMSuspended, ""},
		{golibvirt.DOMAIN_NOSTATE, 0, xen.StateUnknown, ""},
	}
	for _, c := range cases {
		st, why := stateName(c.st, c.reason)
		if st != c.state || why != c.why {
			t.Errorf("stateName(%d, %d) = %q %q, want %q %q", c.st, c.reason, st, why, c.state, c.why)
		}
	}
}
