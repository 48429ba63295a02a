package memserver

import (
	"fmt"
	"os"
)

// ramFile reads the RAM file by path, opening it for each read. The server
// must not keep a descriptor of its own file open: closing one sends FUSE
// a FLUSH, and a server killed with SIGKILL closes its descriptors on the
// way out, when nothing of it is left to answer, so it would hang in exit
// forever with the mount still alive (seen: a D-state zombie in
// fuse_flush, and the next server unable to mount). An open per read
// makes that window one read long.
type ramFile struct{ path string }

// ReadAt is a pread(2): a system call, safe on the file this process
// serves (unlike a fault on a mapping of it).
func (r ramFile) ReadAt(p []byte, off int64) (int, error) {
	f, err := os.Open(r.path)
	if err != nil {
		return 0, fmt.Errorf("open RAM file: %w", err)
	}
	defer f.Close()
	return f.ReadAt(p, off)
}
