package api

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

type credKey struct{}

// peer is who is on the other end of a connection.
type peer struct {
	uid, gid uint32
	pid      int32
	err      error
}

// connContext stores the peer's credentials in the connection's context.
// It is http.Server.ConnContext.
func connContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return context.WithValue(ctx, credKey{}, peer{err: fmt.Errorf("not a unix socket connection")})
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return context.WithValue(ctx, credKey{}, peer{err: err})
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		cerr = err
	}
	if cerr != nil {
		return context.WithValue(ctx, credKey{}, peer{err: cerr})
	}
	return context.WithValue(ctx, credKey{}, peer{uid: cred.Uid, gid: cred.Gid, pid: cred.Pid})
}

// allowed reports whether the peer is root or in group gid (primary or
// supplementary; the latter read from /proc, since SO_PEERCRED carries only
// the primary group). gid < 0 means root only.
func (p peer) allowed(gid int, group string) (bool, string) {
	if p.err != nil {
		return false, "peer credentials unavailable: " + p.err.Error()
	}
	if p.uid == 0 {
		return true, ""
	}
	if gid >= 0 && (int(p.gid) == gid || inSupplementaryGroup(p.pid, gid)) {
		return true, ""
	}
	if gid < 0 {
		return false, fmt.Sprintf("uid %d is not root, and no group may use this socket (api.group in hostd.toml names none that exists)", p.uid)
	}
	return false, fmt.Sprintf("uid %d is neither root nor in group %s (usermod -aG %s USER, then log in again)", p.uid, group, group)
}

func inSupplementaryGroup(pid int32, gid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "Groups:"); ok {
			for _, g := range strings.Fields(rest) {
				if n, err := strconv.Atoi(g); err == nil && n == gid {
					return true
				}
			}
		}
	}
	return false
}
