package api

import (
	"encoding/json"
	"net/http"

	"hostd/hostd/errdefs"
	"hostd/hostd/valid"
)

// Error is the body of every non-2xx response.
type Error struct {
	// Code is stable and machine-readable; Message is for people.
	Code    string `json:"code"`
	Message string `json:"error"`
}

// errBadRequest is what the API layer itself refuses (bodies, query
// parameters): the same code as any other invalid field.
var errBadRequest = valid.ErrRequest

// writeError answers with err's class and code (errdefs.HTTP): the layers
// below declare what their errors mean, the API does not list them.
func writeError(w http.ResponseWriter, err error) {
	code, name := errdefs.HTTP(err)
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
