package guestimage

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Require returns the guest image for a test, building it into the
// repository's build/guest (the Makefile's location) if needed. The test is
// skipped, with the reason, when the Debian packages cannot be downloaded,
// and fails on any other build error.
func Require(t testing.TB) Image {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	root, err := RepoRoot(wd)
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	// A cold build downloads a 27 MB kernel package and compiles the
	// agent; cached it is well under a second.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	img, err := Build(ctx, log, root, filepath.Join(root, "build", "guest"))
	if errors.Is(err, ErrPackagesUnavailable) {
		t.Skipf("guest image cannot be built here: %v", err)
	}
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	return img
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
