package bdi

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseStats(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "stats")
	os.WriteFile(p, []byte(strings.Join([]string{
		"BdiWriteback:            8 kB", "BdiReclaimable:       1024 kB", "BdiDirtyThresh:            0 kB"}, "\n")), 0o600)
	if n, ok := parseStats(p); !ok || n != (8+1024)<<10 {
		t.Fatalf("parsed %d %v", n, ok)
	}
	os.WriteFile(p, []byte("BdiWriteback: x kB\n"), 0o600)
	if _, ok := parseStats(p); ok {
		t.Fatal("garbage parsed")
	}
}

func TestOfRootFS(t *testing.T) {
	d, err := Of("/")
	if err != nil || d.Name == "" {
		t.Fatalf("%+v %v", d, err)
	}
	if _, err := Of("/nonexistent/x"); err == nil {
		t.Fatal("no error for a missing path")
	}
}
