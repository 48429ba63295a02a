package memfs

import (
	"context"
	"fmt"
	"os"
)

// FileSink writes the dirty-page stream into a local file at the same
// offsets: a local checkpoint, and the reference sink of tests and
// benchmarks.
type FileSink struct {
	F *os.File
}

// WritePages writes data at off.
func (s FileSink) WritePages(_ context.Context, off int64, data []byte) error {
	if _, err := s.F.WriteAt(data, off); err != nil {
		return fmt.Errorf("file sink: %w", err)
	}
	return nil
}

// Flush does nothing: WriteAt has handed the data to the kernel, which is
// all a barrier promises (durability is the caller's fsync).
func (s FileSink) Flush(context.Context) error { return nil }

// FileSource serves pages from a local file (a restore from a local
// checkpoint).
type FileSource struct {
	F *os.File
}

// ReadPages reads p at off.
func (s FileSource) ReadPages(_ context.Context, off int64, p []byte) error {
	if _, err := s.F.ReadAt(p, off); err != nil {
		return fmt.Errorf("file source: %w", err)
	}
	return nil
}
