package memserver

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"hostd/hostd/logging"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

// spawnTimeout bounds the wait for a new server's socket when ctx has no
// deadline: mounting takes milliseconds, so this only catches a server
// that hangs.
const spawnTimeout = 30 * time.Second

// Spawn starts a memory server process, `exe args...` (hostd passes its
// own executable and `memserve -config FILE`, FILE holding cfg as JSON),
// and waits until its control socket answers. The process gets a session
// of its own, so that neither a signal to hostd's process group nor
// hostd's death (even by SIGKILL) reaches it; its output is appended to
// logFile. cfg supplies the socket to wait on and the VM's name; Spawn
// writes nothing but the log. On failure the process is killed and the
// error carries the end of its log.
func Spawn(ctx context.Context, exe string, args []string, cfg Config, logFile string) (*Client, int, error) {
	op := "spawn memory server of VM " + cfg.VM
	lf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: log file: %w", op, err)
	}
	defer lf.Close()
	start, _ := lf.Seek(0, io.SeekEnd)
	// Not CommandContext: ctx bounds the start, not the server's life.
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", op, err)
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	// Reap it whenever it ends, for as long as this process lives.
	go func() { exited <- cmd.Wait() }()

	fail := func(why error) (*Client, int, error) {
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		return nil, 0, fmt.Errorf("%s (pid %d): %w%s", op, pid, why, logTail(logFile, start))
	}
	// A full restore copies every page before the socket answers: minutes
	// for a large guest on a slow link, bounded by ctx alone (a crash is
	// still seen at once, through exited).
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if cfg.Restore == nil || cfg.Restore.Mode != "full" {
		wctx, cancel = context.WithTimeout(ctx, spawnTimeout)
	}
	defer cancel()
	c := New(cfg.Socket)
	c.setVM(cfg.VM)
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		actx, acancel := context.WithTimeout(wctx, 2*time.Second)
		st, err := c.Status(actx)
		acancel()
		if err == nil {
			if st.PID != pid {
				return fail(fmt.Errorf("socket %s is answered by pid %d, another memory server", cfg.Socket, st.PID))
			}
			return c, pid, nil
		}
		select {
		case werr := <-exited:
			return nil, 0, fmt.Errorf("%s (pid %d): exited before answering: %v%s", op, pid, werr, logTail(logFile, start))
		case <-wctx.Done():
			return fail(fmt.Errorf("no answer on %s: %w", cfg.Socket, wctx.Err()))
		case <-t.C:
		}
	}
}

// logTail returns what the server logged since start, shortened, for an
// error message: the reason it did not come up is in there.
func logTail(path string, start int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.NewSectionReader(f, start, 1<<20))
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return ""
	}
	if len(b) > 1500 {
		b = b[len(b)-1500:]
	}
	return "; its log: " + string(b)
}

// Main is the `memserve` command: `memserve -config FILE`, FILE a JSON
// Config. args are the arguments after "memserve". It logs JSON to stderr,
// stops on SIGTERM or SIGINT (stops streaming, unmounts) and returns the
// exit code. hostd's main calls it when os.Args[1] is "memserve".
func Main(args []string) int {
	fl := flag.NewFlagSet("memserve", flag.ContinueOnError)
	cfgPath := fl.String("config", "", "the memory server's configuration (JSON)")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if *cfgPath == "" || fl.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: memserve -config FILE")
		return 2
	}
	cfg, err := readConfig(*cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "memserve:", err)
		return 1
	}
	var level slog.Level
	if cfg.LogLevel != "" {
		if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
			fmt.Fprintf(os.Stderr, "memserve: config %s: log_level %q: %v\n", *cfgPath, cfg.LogLevel, err)
			return 1
		}
	}
	// Under hostd-memserver@.service its stderr is the journal, with
	// priorities as hostd's own lines.
	log := logging.New(os.Stderr, logging.Options{Level: level.String(), Journal: logging.UnderJournal(os.Stderr)}).With("component", "memserver")
	// Its own session has no terminal; a stray SIGHUP must not end it.
	signal.Ignore(syscall.SIGHUP)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := Run(ctx, cfg, log); err != nil {
		log.Error("memory server failed", "err", err)
		return 1
	}
	return 0
}

func readConfig(path string) (Config, error) {
	var cfg Config
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	if err := cfg.validate(); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// WriteConfig writes cfg as the JSON file Main reads (0600: it names key
// files), atomically.
func WriteConfig(path string, cfg Config) error {
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return fmt.Errorf("write memory server config: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write memory server config: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write memory server config: %w", err)
	}
	return nil
}
