package logging

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Under the journal every line starts with its level's syslog priority and
// is otherwise the ordinary record, attributes and groups included.
func TestJournalLinesCarryPriorities(t *testing.T) {
	var buf bytes.Buffer
	log := New(&buf, Options{Level: "debug", Journal: true}).With("component", "test").WithGroup("g")
	log.Debug("d", "k", 1)
	log.Info("i")
	log.Warn("w")
	log.Error("e\nsecond line")
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	want := []string{"<7>", "<6>", "<4>", "<3>"}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, l := range lines {
		rest, ok := strings.CutPrefix(l, want[i])
		if !ok {
			t.Fatalf("line %d %q does not start with %s", i, l, want[i])
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(rest), &rec); err != nil {
			t.Fatalf("line %d is not a JSON record after its priority: %v", i, err)
		}
		if rec["component"] != "test" {
			t.Fatalf("line %d lost the logger's attributes: %v", i, rec)
		}
	}
	if !strings.Contains(lines[0], `"g":{"k":1}`) {
		t.Fatalf("the group is lost: %s", lines[0])
	}
}

func TestLevelFilterAndPlainOutput(t *testing.T) {
	var buf bytes.Buffer
	log := New(&buf, Options{Level: "warn", Format: "text"})
	log.Info("hidden")
	log.Warn("shown")
	if out := buf.String(); strings.Contains(out, "hidden") || !strings.Contains(out, "shown") || strings.HasPrefix(out, "<") {
		t.Fatalf("output %q", out)
	}
}

func TestUnderJournalMatchesTheStream(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stream")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino))
	if !UnderJournal(f) {
		t.Fatal("the stream JOURNAL_STREAM names was not recognised")
	}
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino+1))
	if UnderJournal(f) {
		t.Fatal("another stream was taken for the journal (a child that inherited the variable)")
	}
}
