package errdefs

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
)

func TestOutermostCodedErrorDecides(t *testing.T) {
	inner := New(ErrPeer, "backup_unavailable", "backup unavailable")
	outer := New(ErrNotFound, "restore_point_not_found", "no such restore point")
	err := fmt.Errorf("restore: %w: %w", outer, fmt.Errorf("dial: %w", inner))
	if s, c := HTTP(err); s != http.StatusNotFound || c != "restore_point_not_found" {
		t.Fatalf("HTTP = %d %q, want 404 restore_point_not_found", s, c)
	}
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, ErrPeer) || errors.Is(err, ErrConflict) {
		t.Fatal("errors.Is does not see the classes of the wrapped coded errors")
	}
}

func TestUncodedErrorIsInternal(t *testing.T) {
	if s, c := HTTP(errors.New("boom")); s != 500 || c != Internal {
		t.Fatalf("HTTP = %d %q, want 500 internal", s, c)
	}
	if Code(nil) != "" {
		t.Fatal("Code(nil) is not empty")
	}
}
