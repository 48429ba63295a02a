package logging

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Options choose the logger.
type Options struct {
	Level  string // debug | info | warn | error (default info)
	Format string // json (default) | text
	// Journal prefixes each line with its syslog priority.
	Journal bool
	// Var, if set, holds the level instead, so that it can change while
	// the logger runs (a reload); it is set from Level first.
	Var *slog.LevelVar
}

// New returns a logger writing to w.
func New(w io.Writer, o Options) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(o.Level))
	opts := &slog.HandlerOptions{Level: level}
	if o.Var != nil {
		o.Var.Set(level)
		opts.Level = o.Var
	}
	if !o.Journal {
		return slog.New(inner(w, o.Format, opts))
	}
	return slog.New(&journal{w: w, format: o.Format, opts: opts, mu: &sync.Mutex{}})
}

func inner(w io.Writer, format string, opts *slog.HandlerOptions) slog.Handler {
	if format == "text" {
		return slog.NewTextHandler(w, opts)
	}
	return slog.NewJSONHandler(w, opts)
}

// UnderJournal reports whether f (stderr) is the stream systemd connected
// to the journal: $JOURNAL_STREAM names its device and inode (systemd.exec(5)).
func UnderJournal(f *os.File) bool {
	want := os.Getenv("JOURNAL_STREAM")
	if want == "" {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return want == fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

// Priority is the syslog priority journald gives a record of level l.
func Priority(l slog.Level) int {
	switch {
	case l >= slog.LevelError:
		return 3 // err
	case l >= slog.LevelWarn:
		return 4 // warning
	case l >= slog.LevelInfo:
		return 6 // info
	default:
		return 7 // debug
	}
}

// journal formats each record with the ordinary handler into a buffer and
// writes it with its priority in front: a handler's attributes and groups
// are replayed on the buffer's handler, in the order they were added.
type journal struct {
	w      io.Writer
	format string
	opts   *slog.HandlerOptions
	ops    []func(slog.Handler) slog.Handler
	mu     *sync.Mutex // one writer: lines never interleave
}

func (j *journal) Enabled(_ context.Context, l slog.Level) bool {
	return l >= j.opts.Level.Level()
}

func (j *journal) Handle(ctx context.Context, r slog.Record) error {
	var buf bytes.Buffer
	h := inner(&buf, j.format, j.opts)
	for _, op := range j.ops {
		h = op(h)
	}
	if err := h.Handle(ctx, r); err != nil {
		return err
	}
	// A message with a newline would start a line without a priority.
	line := strings.ReplaceAll(strings.TrimSuffix(buf.String(), "\n"), "\n", " ")
	j.mu.Lock()
	defer j.mu.Unlock()
	_, err := fmt.Fprintf(j.w, "<%d>%s\n", Priority(r.Level), line)
	return err
}

func (j *journal) with(op func(slog.Handler) slog.Handler) *journal {
	c := *j
	c.ops = append(append([]func(slog.Handler) slog.Handler{}, j.ops...), op)
	return &c
}

func (j *journal) WithAttrs(as []slog.Attr) slog.Handler {
	return j.with(func(h slog.Handler) slog.Handler { return h.WithAttrs(as) })
}

func (j *journal) WithGroup(name string) slog.Handler {
	return j.with(func(h slog.Handler) slog.Handler { return h.WithGroup(name) })
}
