package api

import (
	"fmt"
	"net/http"

	"hostd/hostd/swap"
	"hostd/hostd/vm"
)

func (s *Server) getRepo(w http.ResponseWriter, r *http.Request) {
	if s.d.Repo == nil {
		writeErrorCode(w, http.StatusNotImplemented, "not_configured", `this hostd does not play the repo role (add "repo" to roles and configure [repo])`)
		return
	}
	writeJSON(w, http.StatusOK, RepoStatus{Listen: s.d.Repo.Listen, Status: s.d.Repo.Server.Status()})
}

func (s *Server) putMemory(w http.ResponseWriter, r *http.Request) {
	var req vm.MemoryRequest
	if err := decode(r, &req, false); err != nil {
		writeError(w, fmt.Errorf("set VM memory: %w", err))
		return
	}
	st, err := s.d.VMs.SetBalloon(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) putSwap(w http.ResponseWriter, r *http.Request) {
	if s.d.Swap == nil {
		writeErrorCode(w, http.StatusNotImplemented, "not_configured", "this hostd does not run swap devices")
		return
	}
	var req swap.Request
	if err := decode(r, &req, false); err != nil {
		writeError(w, fmt.Errorf("swap: %w", err))
		return
	}
	st, err := s.d.Swap.Put(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/vms/"+r.PathValue("name")+"/swap")
	writeJSON(w, http.StatusCreated, st)
}

func (s *Server) getSwap(w http.ResponseWriter, r *http.Request) {
	if s.d.Swap == nil {
		writeErrorCode(w, http.StatusNotImplemented, "not_configured", "this hostd does not run swap devices")
		return
	}
	st, err := s.d.Swap.Get(r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) deleteSwap(w http.ResponseWriter, r *http.Request) {
	if s.d.Swap == nil {
		writeErrorCode(w, http.StatusNotImplemented, "not_configured", "this hostd does not run swap devices")
		return
	}
	if err := s.d.Swap.Delete(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) listSwap(w http.ResponseWriter, r *http.Request) {
	if s.d.Swap == nil {
		writeErrorCode(w, http.StatusNotImplemented, "not_configured", "this hostd does not run swap devices")
		return
	}
	writeJSON(w, http.StatusOK, s.d.Swap.List())
}
