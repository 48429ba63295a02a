package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
)

// maxBody bounds a request body: no valid request is near it.
const maxBody = 1 << 20

// decode reads exactly one JSON value into v, rejecting unknown fields,
// trailing data and oversized bodies, with messages that name the problem.
// An empty body leaves v at its zero value when allowEmpty is set.
func decode(r *http.Request, v any, allowEmpty bool) error {
	body := http.MaxBytesReader(nil, r.Body, maxBody)
	data, err := io.ReadAll(body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fmt.Errorf("%w: body larger than %d bytes", errBadRequest, maxBody)
		}
		return fmt.Errorf("%w: read body: %v", errBadRequest, err)
	}
	if len(data) == 0 {
		if allowEmpty {
			return nil
		}
		return fmt.Errorf("%w: a JSON body is required", errBadRequest)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var syn *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.Is(err, io.ErrUnexpectedEOF):
			return fmt.Errorf("%w: malformed JSON: the body ends in the middle of a value", errBadRequest)
		case errors.As(err, &syn):
			return fmt.Errorf("%w: malformed JSON at byte %d: %v", errBadRequest, syn.Offset, err)
		case errors.As(err, &typ):
			return fmt.Errorf("%w: field %q must be %v, not JSON %s", errBadRequest, typ.Field, typ.Type, typ.Value)
		default:
			return fmt.Errorf("%w: %v", errBadRequest, err)
		}
	}
	if dec.More() {
		return fmt.Errorf("%w: trailing data after the JSON body", errBadRequest)
	}
	return nil
}
