package memfstest

import (
	"context"
	"os"
	"sync"
	"time"
)

// RateSink delivers into a file at no more than Rate bytes/s: a backup
// link of known bandwidth. It measures the rate it actually achieves.
type RateSink struct {
	Rate float64
	F    *os.File

	mu   sync.Mutex
	t0   time.Time
	sent int64
}

func (s *RateSink) WritePages(ctx context.Context, off int64, data []byte) error {
	s.mu.Lock()
	if s.t0.IsZero() {
		s.t0 = time.Now()
	}
	s.sent += int64(len(data))
	due := s.t0.Add(time.Duration(float64(s.sent) / s.Rate * float64(time.Second)))
	s.mu.Unlock()
	t := time.NewTimer(time.Until(due))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	_, err := s.F.WriteAt(data, off)
	return err
}

func (s *RateSink) Flush(context.Context) error { return nil }

// Measured is the achieved delivery rate so far.
func (s *RateSink) Measured() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.t0.IsZero() {
		return 0
	}
	return float64(s.sent) / time.Since(s.t0).Seconds()
}
