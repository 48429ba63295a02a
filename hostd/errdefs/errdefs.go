package errdefs

import (
	"errors"
	"net/http"
)

// Class is a kind of failure with one HTTP status.
type Class struct {
	name   string
	status int
}

func (c *Class) Error() string { return c.name }

// Status is the class's HTTP status.
func (c *Class) Status() int { return c.status }

// The classes. A request that cannot succeed as written is Invalid; one
// that names nothing is NotFound; one that clashes with what exists or
// with the state something is in is Conflict (the message says what to
// change first); a peer host (backup, repository) that failed is Peer.
var (
	ErrInvalid        = &Class{"invalid request", http.StatusBadRequest}
	ErrForbidden      = &Class{"forbidden", http.StatusForbidden}
	ErrNotFound       = &Class{"not found", http.StatusNotFound}
	ErrConflict       = &Class{"conflict", http.StatusConflict}
	ErrNotImplemented = &Class{"not implemented", http.StatusNotImplemented}
	ErrUnavailable    = &Class{"unavailable", http.StatusServiceUnavailable}
	ErrPeer           = &Class{"peer failed", http.StatusBadGateway}
)

// Error is a sentinel error of a class with a stable code. Packages
// declare theirs with New and wrap them with %w.
type Error struct {
	class *Class
	code  string
	msg   string
}

// New returns a sentinel of class c with API code code.
func New(c *Class, code, msg string) *Error { return &Error{class: c, code: code, msg: msg} }

func (e *Error) Error() string { return e.msg }

// Is makes errors.Is(err, class) true for the class's errors.
func (e *Error) Is(target error) bool { return target == e.class }

// Code is the error's stable API code.
func (e *Error) Code() string { return e.code }

// Class is the error's class.
func (e *Error) Class() *Class { return e.class }

// Internal is the code of an error that names no class.
const Internal = "internal"

// HTTP maps err to an HTTP status and API code: those of the outermost
// coded error in its chain (the layer closest to the request knows best
// what a failure means), else 500 "internal".
func HTTP(err error) (status int, code string) {
	var e *Error
	if errors.As(err, &e) {
		return e.class.status, e.code
	}
	return http.StatusInternalServerError, Internal
}

// Code is err's API code (see HTTP); "" for a nil error.
func Code(err error) string {
	if err == nil {
		return ""
	}
	_, c := HTTP(err)
	return c
}
