package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The socket's group is tested with real processes: curl run as the
// unprivileged user nobody, with and without a supplementary group that
// hostd is configured to admit. "users" exists on every Debian system; the
// test changes no account.
const (
	testGroup = "users"
	nobodyUID = 65534
)

type outsider struct {
	gid     uint32
	inGroup bool
}

// curlAs runs curl as nobody (in the group or not) against the socket and
// returns the HTTP status (0: curl could not connect) and body.
func (o outsider) curl(t *testing.T, sock, method, path string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10",
		"--unix-socket", sock, "-X", method, "http://hostd"+path)
	cred := &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID, Groups: []uint32{}}
	if o.inGroup {
		cred.Groups = []uint32{o.gid}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	out, _ := cmd.Output() // curl exits non-zero when it cannot connect
	i := bytes.LastIndexByte(out, '\n')
	if i < 0 {
		t.Fatalf("curl %s %s: no status in %q", method, path, out)
	}
	code, err := strconv.Atoi(strings.TrimSpace(string(out[i+1:])))
	if err != nil {
		t.Fatalf("curl %s %s: status %q", method, path, out[i+1:])
	}
	return code, out[:i]
}

func socketTestPrereqs(t *testing.T) uint32 {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user (CI runs as root)")
	}
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is missing: images/blanket/provision.sh installs it")
	}
	g, err := user.LookupGroup(testGroup)
	if err != nil {
		t.Fatalf("group %s: %v", testGroup, err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	return uint32(gid)
}

// openPath lets nobody walk down to dir (t.TempDir's directories are 0700).
func openPath(t *testing.T, root string) {
	t.Helper()
	for d := root; d != "/" && d != "."; d = filepath.Dir(d) {
		if strings.HasPrefix(d, os.TempDir()+"/") {
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// A member of the configured group reaches hostd and a user outside it does
// not, whoever made the run directory: hostd itself, systemd's
// RuntimeDirectory= (0750 root:root, made again at each start), or
// tmpfiles (the group as hostd.tmpfiles sets it).
func TestSocketGroupCanConnectInEveryLayout(t *testing.T) {
	gid := socketTestPrereqs(t)
	layouts := map[string]func(t *testing.T, run string){
		"created by hostd": func(t *testing.T, run string) {},
		"RuntimeDirectory=": func(t *testing.T, run string) {
			if err := os.Mkdir(run, 0o750); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(run, 0, 0); err != nil {
				t.Fatal(err)
			}
		},
		"tmpfiles": func(t *testing.T, run string) {
			if _, err := exec.LookPath("systemd-tmpfiles"); err != nil {
				t.Fatal("systemd-tmpfiles is missing: images/blanket/provision.sh installs systemd")
			}
			conf := filepath.Join(filepath.Dir(run), "hostd.conf")
			line := fmt.Sprintf("d %s 0750 root %s -\n", run, testGroup)
			if err := os.WriteFile(conf, []byte(line), 0o644); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("systemd-tmpfiles", "--create", conf).CombinedOutput(); err != nil {
				t.Fatalf("systemd-tmpfiles: %v: %s", err, out)
			}
		},
	}
	for name, layout := range layouts {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			openPath(t, root)
			layout(t, filepath.Join(root, "run"))
			e := startWith(t, envOpts{dir: root, group: testGroup})
			st, err := os.Stat(filepath.Dir(e.sock))
			if err != nil {
				t.Fatal(err)
			}
			if sys := st.Sys().(*syscall.Stat_t); sys.Gid != gid || st.Mode().Perm()&0o057 != 0o050 {
				t.Errorf("run directory %s: mode %v gid %d, want group %d with r-x and nothing for others", filepath.Dir(e.sock), st.Mode(), sys.Gid, gid)
			}
			if code, body := (outsider{gid, true}).curl(t, e.sock, "GET", "/v1/host"); code != 200 {
				t.Errorf("a member of %s: HTTP %d %s, want 200", testGroup, code, body)
			}
			if code, body := (outsider{gid, false}).curl(t, e.sock, "GET", "/v1/host"); code == 200 {
				t.Errorf("a user outside %s was served: %s", testGroup, body)
			}
		})
	}
}

// A user outside the group who reaches the socket anyway (its modes
// loosened by hand) is refused on every route, the catch-all 404 and the
// 405 of a known path included, with a JSON 403 that names the group.
func TestOutsiderIsForbiddenOnEveryRoute(t *testing.T) {
	gid := socketTestPrereqs(t)
	root := t.TempDir()
	openPath(t, root)
	e := startWith(t, envOpts{dir: root, group: testGroup})
	if err := os.Chmod(filepath.Dir(e.sock), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(e.sock, 0o666); err != nil {
		t.Fatal(err)
	}
	reqs := [][2]string{{"GET", "/nothing/here"}, {"PATCH", "/v1/vms"}, {"GET", "/v1/vms/..%2Fx"}, {"GET", "/v1/vms/../x"}}
	for _, r := range e.srv.Routes {
		method, path, _ := strings.Cut(r, " ")
		path = strings.NewReplacer("{name}", "web", "{id}", "7").Replace(path)
		reqs = append(reqs, [2]string{method, path})
	}
	for _, r := range reqs {
		code, body := (outsider{gid, false}).curl(t, e.sock, r[0], r[1])
		var ae struct{ Code, Error string }
		if code != 403 || json.Unmarshal(body, &ae) != nil || ae.Code != "forbidden" || !strings.Contains(ae.Error, testGroup) {
			t.Errorf("outsider %s %s: HTTP %d %s, want a JSON 403 naming group %s", r[0], r[1], code, body, testGroup)
		}
	}
	if code, _ := (outsider{gid, true}).curl(t, e.sock, "GET", "/nothing/here"); code != 404 {
		t.Errorf("a member on an unknown path: HTTP %d, want 404", code)
	}
}
