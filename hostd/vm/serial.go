package vm

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
)

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
