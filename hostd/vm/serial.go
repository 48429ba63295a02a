package vm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"
)

// WaitForLine follows the file at path from offset (the file may not exist
// yet) until a line containing marker appears, and returns that line.
// It polls: serial logs are written by QEMU in another process, and a poll
// every 20 ms costs nothing next to a boot of seconds.
func WaitForLine(ctx context.Context, path string, offset int64, marker string) (string, error) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var pending []byte
	for {
		f, err := os.Open(path)
		switch {
		case err == nil:
			if _, err := f.Seek(offset, io.SeekStart); err != nil {
				f.Close()
				return "", fmt.Errorf("follow %s: %w", path, err)
			}
			data, err := io.ReadAll(f)
			f.Close()
			if err != nil {
				return "", fmt.Errorf("follow %s: %w", path, err)
			}
			offset += int64(len(data))
			pending = append(pending, data...)
			for {
				i := bytes.IndexByte(pending, '\n')
				if i < 0 {
					break
				}
				line := string(bytes.TrimRight(pending[:i], "\r"))
				pending = pending[i+1:]
				if bytes.Contains([]byte(line), []byte(marker)) {
					return line, nil
				}
			}
		case !errors.Is(err, fs.ErrNotExist):
			return "", fmt.Errorf("follow %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("wait for %q in %s: %w", marker, path, ctx.Err())
		case <-tick.C:
		}
	}
}

// TailLines returns the last n lines of the file at path (all if n <= 0),
// reading at most the last 1 MiB: a console tail, not a log archive.
func TailLines(path string, n int) ([]byte, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // nothing printed yet
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	const window = 1 << 20
	start := max(st.Size()-window, 0)
	data, err := io.ReadAll(io.NewSectionReader(f, start, st.Size()-start))
	if err != nil {
		return nil, err
	}
	if n <= 0 {
		return data, nil
	}
	var lines [][]byte
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), window)
	for sc.Scan() {
		lines = append(lines, append([]byte(nil), sc.Bytes()...))
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	if len(lines) == 0 {
		return nil, nil
	}
	return append(bytes.Join(lines, []byte("\n")), '\n'), nil
}
