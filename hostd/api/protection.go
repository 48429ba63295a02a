package api

import (
	"fmt"
	"net/http"

	"hostd/hostd/protect"
)

// Protection routes answer 501 on a host without the memory plane.
func (s *Server) protection(w http.ResponseWriter) (*protect.Manager, bool) {
	if s.d.Protection == nil {
		writeErrorCode(w, http.StatusNotImplemented, "not_configured", "this hostd does not run the host role's memory plane")
		return nil, false
	}
	return s.d.Protection, true
}

func (s *Server) putProtection(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	var req protect.Request
	if err := decode(r, &req, false); err != nil {
		writeError(w, fmt.Errorf("protect VM: %w", err))
		return
	}
	j, err := p.Protect(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID)
	writeJSON(w, http.StatusAccepted, j)
}

func (s *Server) getProtection(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	st, err := p.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) deleteProtection(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	if err := p.Unprotect(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) listProtection(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	l, err := p.List(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, l)
}

func (s *Server) evacuateVM(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	var req protect.EvacuateRequest
	if err := decode(r, &req, true); err != nil {
		writeError(w, fmt.Errorf("evacuate VM: %w", err))
		return
	}
	j, err := p.Evacuate(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID)
	writeJSON(w, http.StatusAccepted, j)
}

func (s *Server) epochVM(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	if err := decode(r, &struct{}{}, true); err != nil {
		writeError(w, err)
		return
	}
	rep, err := p.Epoch(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

func (s *Server) evacuateHost(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	var req protect.EvacuateRequest
	if err := decode(r, &req, true); err != nil {
		writeError(w, fmt.Errorf("evacuate host: %w", err))
		return
	}
	j, err := p.EvacuateHost(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID)
	writeJSON(w, http.StatusAccepted, j)
}

func (s *Server) restoreVM(w http.ResponseWriter, r *http.Request) {
	p, ok := s.protection(w)
	if !ok {
		return
	}
	var req protect.RestoreRequest
	if err := decode(r, &req, false); err != nil {
		writeError(w, fmt.Errorf("restore VM: %w", err))
		return
	}
	j, err := p.Restore(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID)
	writeJSON(w, http.StatusAccepted, j)
}
