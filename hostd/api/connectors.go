package api

import (
	"fmt"
	"net/http"
	"strconv"

	"hostd/hostd/connector"
)

// connectorID parses the {id} path segment.
func connectorID(r *http.Request) (uint32, error) {
	v, err := strconv.ParseUint(r.PathValue("id"), 10, 32)
	if err != nil || v == 0 || v > connector.MaxID {
		return 0, fmt.Errorf("%w: connector id %q must be a number from 1 to %d", errBadRequest, r.PathValue("id"), connector.MaxID)
	}
	return uint32(v), nil
}

func (s *Server) listConnectors(w http.ResponseWriter, r *http.Request) {
	cs, err := s.d.Connectors.List()
	if err != nil {
		writeError(w, err)
		return
	}
	if cs == nil {
		cs = []connector.Record{}
	}
	writeJSON(w, http.StatusOK, cs)
}

func (s *Server) createConnector(w http.ResponseWriter, r *http.Request) {
	var spec connector.Spec
	if err := decode(r, &spec, false); err != nil {
		writeError(w, fmt.Errorf("create connector: %w", err))
		return
	}
	rec, err := s.d.Connectors.Create(r.Context(), spec)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", fmt.Sprintf("/v1/connectors/%d", rec.ID))
	writeJSON(w, http.StatusCreated, rec)
}

func (s *Server) getConnector(w http.ResponseWriter, r *http.Request) {
	id, err := connectorID(r)
	if err != nil {
		writeError(w, err)
		return
	}
	rec, err := s.d.Connectors.Get(id)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

// updateConnector retargets: the body is the whole new spec; its id may be
// omitted but must not contradict the path.
func (s *Server) updateConnector(w http.ResponseWriter, r *http.Request) {
	id, err := connectorID(r)
	if err != nil {
		writeError(w, err)
		return
	}
	var spec connector.Spec
	if err := decode(r, &spec, false); err != nil {
		writeError(w, fmt.Errorf("retarget connector: %w", err))
		return
	}
	if spec.ID != 0 && spec.ID != id {
		writeError(w, fmt.Errorf("retarget connector %d: %w: body names connector %d; IDs cannot change", id, errBadRequest, spec.ID))
		return
	}
	spec.ID = id
	rec, err := s.d.Connectors.Update(r.Context(), spec)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

func (s *Server) deleteConnector(w http.ResponseWriter, r *http.Request) {
	id, err := connectorID(r)
	if err != nil {
		writeError(w, err)
		return
	}
	if err := s.d.Connectors.Delete(r.Context(), id); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) connectorStats(w http.ResponseWriter, r *http.Request) {
	id, err := connectorID(r)
	if err != nil {
		writeError(w, err)
		return
	}
	st, err := s.d.Connectors.Stats(r.Context(), id)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}
