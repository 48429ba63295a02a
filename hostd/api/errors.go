package api

import (
	"encoding/json"
	"errors"
	"net/http"

	"hostd/dataplane"
	"hostd/hostd/connector"
	"hostd/hostd/jobs"
	"hostd/hostd/protect"
	"hostd/hostd/swap"
	"hostd/hostd/vm"
	"hostd/xen"
)

// Error is the body of every non-2xx response.
type Error struct {
	// Code is stable and machine-readable; Message is for people.
	Code    string `json:"code"`
	Message string `json:"error"`
}

// status maps an error from the layers below to an HTTP status and code.
func status(err error) (int, string) {
	switch {
	case errors.Is(err, vm.ErrInvalid), errors.Is(err, xen.ErrInvalidSpec), errors.Is(err, errBadRequest),
		errors.Is(err, dataplane.ErrInvalid), errors.Is(err, dataplane.ErrNotLocal),
		errors.Is(err, dataplane.ErrDeviceInUse), errors.Is(err, dataplane.ErrUnknownDevice):
		return http.StatusBadRequest, "invalid_request"
	case errors.Is(err, swap.ErrInvalid):
		return http.StatusBadRequest, "invalid_request"
	case errors.Is(err, swap.ErrExists):
		return http.StatusConflict, "exists"
	case errors.Is(err, swap.ErrNoSwap):
		return http.StatusNotFound, "no_swap"
	case errors.Is(err, swap.ErrProtected), errors.Is(err, protect.ErrHasSwap):
		return http.StatusConflict, "swap_and_protection"
	case errors.Is(err, swap.ErrState):
		return http.StatusConflict, "invalid_state"
	case errors.Is(err, swap.ErrNotConfigured):
		return http.StatusNotImplemented, "not_configured"
	case errors.Is(err, protect.ErrNotServed), errors.Is(err, protect.ErrBadState):
		return http.StatusBadRequest, "invalid_request"
	case errors.Is(err, protect.ErrNotProtected):
		return http.StatusConflict, "not_protected"
	case errors.Is(err, protect.ErrProtected):
		return http.StatusConflict, "protected"
	case errors.Is(err, protect.ErrNotConfigured):
		return http.StatusNotImplemented, "not_configured"
	case errors.Is(err, protect.ErrBackup):
		return http.StatusBadGateway, "backup_unavailable"
	case errors.Is(err, vm.ErrNotFound), errors.Is(err, jobs.ErrNotFound), errors.Is(err, xen.ErrNotFound),
		errors.Is(err, dataplane.ErrNotFound):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, vm.ErrExists), errors.Is(err, xen.ErrExists), errors.Is(err, dataplane.ErrExists):
		return http.StatusConflict, "exists"
	case errors.Is(err, connector.ErrDisabled):
		return http.StatusNotImplemented, "not_configured"
	case errors.Is(err, dataplane.ErrClosed):
		return http.StatusServiceUnavailable, "dataplane_closed"
	case errors.Is(err, xen.ErrState):
		return http.StatusConflict, "invalid_state"
	case errors.Is(err, xen.ErrUnavailable):
		return http.StatusServiceUnavailable, "hypervisor_unavailable"
	default:
		return http.StatusInternalServerError, "internal"
	}
}

var errBadRequest = errors.New("bad request")

func writeError(w http.ResponseWriter, err error) {
	code, name := status(err)
	writeJSON(w, code, Error{Code: name, Message: err.Error()})
}

func writeErrorCode(w http.ResponseWriter, httpCode int, code, msg string) {
	writeJSON(w, httpCode, Error{Code: code, Message: msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
