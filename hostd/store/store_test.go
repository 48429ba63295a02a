package store

import (
	"errors"
	"strings"
	"testing"
	"time"
)

type rec struct {
	Name string
	N    int
}

func TestPutGetListDeleteSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range []string{"b", "a", "c"} {
		if err := Put(s, BucketVMs, n, rec{n, i}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Delete(BucketVMs, "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := Get[rec](s, BucketVMs, "c"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted key: %v, want ErrNotFound", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	all, err := List[rec](s, BucketVMs)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || all[0].Name != "a" || all[1].Name != "b" || all[0].N != 1 {
		t.Fatalf("after reopen: %+v", all)
	}
}

func TestSecondOpenIsRefused(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = Open(dir, 100*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "locked by another process") {
		t.Fatalf("second open: %v", err)
	}
}
