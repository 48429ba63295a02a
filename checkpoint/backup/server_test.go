package backup_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"hostd/checkpoint/backup"
	"hostd/checkpoint/backupclient"
	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/memfs/memfstest"
	"hostd/checkpoint/pki"
	"hostd/checkpoint/wire"
)

const imgSize = 8 << 20

func quiet() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// env is a PKI, a store and a running server on loopback.
type env struct {
	pki   string
	store string
	addr  string
	stop  func()
}

func newPKI(t testing.TB) string {
	dir := t.TempDir()
	if err := pki.Generate(dir, pki.Spec{ServerNames: []string{"localhost", "127.0.0.1"}, Hosts: []string{"host1"}}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func startServer(t testing.TB, pkiDir, storeDir, addr string) (string, func()) {
	st, err := backupstore.Open(storeDir, backupstore.Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	tc, err := pki.DirServerConfig(pkiDir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := backup.New(st, tc, backup.Options{Logger: quiet(), HandshakeTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ctx, ln)
	}()
	return ln.Addr().String(), func() {
		cancel()
		<-done
		st.Close()
	}
}

func newEnv(t testing.TB) *env {
	e := &env{pki: newPKI(t), store: t.TempDir()}
	e.addr, e.stop = startServer(t, e.pki, e.store, "127.0.0.1:0")
	t.Cleanup(e.stop)
	return e
}

func (e *env) client(t testing.TB, vm string, src io.ReaderAt) *backupclient.Stream {
	tc, err := pki.DirClientConfig(e.pki, "host1", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	s, err := backupclient.Open(context.Background(), backupclient.Config{
		Addr: e.addr, TLS: tc, VMID: vm, ImageSize: imgSize, Source: src, Logger: quiet(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// ramFile is a stand-in for a VM's RAM file: random pages in places.
func ramFile(t testing.TB) *os.File {
	f, err := os.Create(filepath.Join(t.TempDir(), "ram"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(imgSize)
	scribble(t, f, 0)
	return f
}

// scribble writes random data to a spread of pages and returns the
// extents it wrote.
func scribble(t testing.TB, f *os.File, seed int) [][2]int64 {
	var ext [][2]int64
	for i := 0; i < 40; i++ {
		off := int64((i*97+seed*31)%(imgSize/4096-8)) * 4096
		n := int64(1+(i+seed)%8) * 4096
		b := make([]byte, n)
		rand.Read(b)
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		ext = append(ext, [2]int64{off, n})
	}
	return ext
}

// sendExtents hands every extent to the stream, like memfs does with each
// write-back even when the stream is broken (the stream records it as owed),
// and returns the first error.
func sendExtents(t testing.TB, s *backupclient.Stream, f *os.File, ext [][2]int64) error {
	var first error
	for _, x := range ext {
		b := make([]byte, x[1])
		f.ReadAt(b, x[0])
		if err := s.SendPages(context.Background(), x[0], b); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// checkStore compares the committed image in storeDir with f.
func checkStore(t *testing.T, storeDir, vm string, f *os.File, wantState string) {
	t.Helper()
	st, err := backupstore.Open(storeDir, backupstore.Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	v, err := st.VM(vm, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if err := v.ReadAll(context.Background(), &got); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, imgSize)
	f.ReadAt(want, 0)
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatal("backup image differs from the RAM file")
	}
	if wantState != "" {
		b, m, err := v.DeviceState()
		if err != nil || string(b) != wantState || !m.Restorable {
			t.Fatalf("device state %q restorable=%v: %v", b, m != nil && m.Restorable, err)
		}
	}
}

func TestStreamCommit(t *testing.T) {
	e := newEnv(t)
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	defer s.Close()
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	if err := s.SendPages(context.Background(), 0, full); err != nil {
		t.Fatal(err)
	}
	if ep, err := s.Commit(context.Background(), false); err != nil || ep != 1 {
		t.Fatalf("commit 1: %d %v", ep, err)
	}
	ext := scribble(t, f, 1)
	if err := sendExtents(t, s, f, ext); err != nil {
		t.Fatal(err)
	}
	if err := s.SendDeviceState(context.Background(), []byte("state")); err != nil {
		t.Fatal(err)
	}
	if ep, err := s.Commit(context.Background(), true); err != nil || ep != 2 {
		t.Fatalf("commit 2: %d %v", ep, err)
	}
	if bw := s.Bandwidth(); bw <= 0 {
		t.Fatalf("no bandwidth measured after an 8 MiB commit: %v", bw)
	}
	st := s.Stats()
	if st.Acked != 2 || st.PendingPages != 0 {
		t.Fatalf("stats %+v", st)
	}
	s.Close()
	e.stop()
	checkStore(t, e.store, "vm1", f, "state")
	// A second Open continues after the committed epoch.
	e.addr, e.stop = startServer(t, e.pki, e.store, "127.0.0.1:0")
	s2 := e.client(t, "vm1", f)
	defer s2.Close()
	if st := s2.Stats(); st.Acked != 2 || st.Epoch != 3 {
		t.Fatalf("reopened stream %+v", st)
	}
}

// TestRejectsUnauthenticated: no certificate, a certificate from another
// CA, and TLS 1.2 all fail the handshake, and nothing reaches the store.
func TestRejectsUnauthenticated(t *testing.T) {
	e := newEnv(t)
	good, err := pki.DirClientConfig(e.pki, "host1", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	noCert := good.Clone()
	noCert.Certificates = nil
	other, err := pki.DirClientConfig(newPKI(t), "host1", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	other.RootCAs = good.RootCAs // trusts the server, but its own cert is foreign
	tls12 := good.Clone()
	tls12.MinVersion, tls12.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	for name, tc := range map[string]*tls.Config{"no certificate": noCert, "foreign CA": other, "TLS 1.2": tls12} {
		_, err := backupclient.Open(context.Background(), backupclient.Config{
			Addr: e.addr, TLS: tc, VMID: "intruder", ImageSize: imgSize, Logger: quiet(), DialTimeout: 5 * time.Second,
		})
		if err == nil {
			t.Fatalf("%s: stream opened", name)
		}
		t.Logf("%s: %v", name, err)
	}
	if _, err := os.Stat(filepath.Join(e.store, "intruder")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unauthenticated peer created a VM: %v", err)
	}
}

// rawSession opens an authenticated connection and says hello, for
// sending hand-made frames.
func rawSession(t *testing.T, e *env, vm string) (*tls.Conn, *wire.Reader) {
	tc, _ := pki.DirClientConfig(e.pki, "host1", "127.0.0.1")
	c, err := tls.Dial("tcp", e.addr, tc)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := wire.AppendFrame(nil, &wire.Hello{Version: wire.Version, VMID: vm, ImageSize: imgSize, Epoch: 1})
	c.Write(b)
	r := wire.NewReader(c)
	if m, err := r.Read(); err != nil || m.Type() != wire.TypeWelcome {
		t.Fatalf("welcome: %v %v", m, err)
	}
	return c, r
}

func TestRejectsMalformed(t *testing.T) {
	e := newEnv(t)
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	s.SendPages(context.Background(), 0, full)
	if _, err := s.Commit(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	s.Close()

	page := bytes.Repeat([]byte{9}, 4096)
	ext, _ := wire.AppendFrame(nil, &wire.Extent{Epoch: 2, Offset: 0, CRC: wire.Checksum(page), Data: page})
	badCRC := bytes.Clone(ext)
	badCRC[len(badCRC)-1] ^= 0xff
	wrongEpoch, _ := wire.AppendFrame(nil, &wire.Extent{Epoch: 7, Offset: 0, CRC: wire.Checksum(page), Data: page})
	outside, _ := wire.AppendFrame(nil, &wire.Extent{Epoch: 2, Offset: imgSize, CRC: wire.Checksum(page), Data: page})
	mismatch := append(bytes.Clone(ext), must(wire.AppendFrame(nil, &wire.Commit{Epoch: 2, Extents: 5}))...)
	cases := []struct {
		name  string
		bytes []byte
		code  wire.ErrorCode
	}{
		{"garbage", []byte("GET / HTTP/1.1\r\n\r\n"), wire.CodeMalformed},
		{"bad crc", badCRC, wire.CodeMalformed},
		{"wrong epoch", wrongEpoch, wire.CodeEpoch},
		{"outside image", outside, wire.CodeProtocol},
		{"commit mismatch", mismatch, wire.CodeMismatch},
		{"fetch outside image", must(wire.AppendFrame(nil, &wire.Fetch{ID: 1, Offset: imgSize, Length: 4096})), wire.CodeProtocol},
		{"fetch missing state", must(wire.AppendFrame(nil, &wire.Fetch{ID: 1, Offset: 0, Length: 10, State: true})), wire.CodeProtocol},
		{"second hello", must(wire.AppendFrame(nil, &wire.Hello{Version: 1, VMID: "vm1", ImageSize: imgSize, Epoch: 1})), wire.CodeProtocol},
	}
	// An absurd image size is refused before anything is created.
	tc, _ := pki.DirClientConfig(e.pki, "host1", "127.0.0.1")
	if _, err := backupclient.Open(context.Background(), backupclient.Config{Addr: e.addr, TLS: tc, VMID: "huge", ImageSize: 1 << 50, Logger: quiet()}); err == nil {
		t.Fatal("2^50-byte image accepted")
	} else {
		t.Logf("huge image: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.store, "huge")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("huge VM created: %v", err)
	}
	for _, c := range cases {
		conn, r := rawSession(t, e, "vm1")
		conn.Write(c.bytes)
		m, err := r.Read()
		conn.Close()
		em, ok := m.(*wire.Error)
		if err != nil || !ok || em.Code != c.code {
			t.Fatalf("%s: got %v %v, want error code %d", c.name, m, err, c.code)
		}
		t.Logf("%s: %s", c.name, em.Message)
	}
	e.stop()
	checkStore(t, e.store, "vm1", f, "")
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// TestMain doubles as a backup server process for the kill -9 test.
func TestMain(m *testing.M) {
	memfstest.Main()
	if spec := os.Getenv("BACKUP_SERVER_CHILD"); spec != "" {
		serverChild(spec)
		return
	}
	os.Exit(m.Run())
}

func serverChild(spec string) {
	parts := strings.SplitN(spec, "|", 3)
	pkiDir, storeDir, addr := parts[0], parts[1], parts[2]
	st, err := backupstore.Open(storeDir, backupstore.Options{Logger: quiet()})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	tc, err := pki.DirServerConfig(pkiDir)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	srv, _ := backup.New(st, tc, backup.Options{Logger: quiet()})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	fmt.Println("listening", ln.Addr())
	// Exit on our own if the parent never kills us.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv.Serve(ctx, ln)
}

func spawnServer(t *testing.T, pkiDir, storeDir, addr string) (*exec.Cmd, string) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BACKUP_SERVER_CHILD="+pkiDir+"|"+storeDir+"|"+addr)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "listening ") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("server child: %q %v", line, err)
	}
	return cmd, strings.TrimSpace(strings.TrimPrefix(line, "listening "))
}

// TestServerKilledResync: the backup server process is killed with
// SIGKILL in the middle of an epoch; a new one starts on the same store;
// the client reconnects, re-sends every unacknowledged page from the RAM
// file, and the final restore point equals the RAM file.
func TestServerKilledResync(t *testing.T) {
	pkiDir, storeDir := newPKI(t), t.TempDir()
	srv, addr := spawnServer(t, pkiDir, storeDir, "127.0.0.1:0")
	defer func() { srv.Process.Kill(); srv.Wait() }()
	e := &env{pki: pkiDir, store: storeDir, addr: addr}
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	defer s.Close()
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	if err := s.SendPages(context.Background(), 0, full); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	// Epoch 2 in flight when the server dies.
	if err := sendExtents(t, s, f, scribble(t, f, 2)); err != nil {
		t.Fatal(err)
	}
	s.Flush(context.Background())
	srv.Process.Signal(syscall.SIGKILL)
	srv.Wait()
	// The guest keeps writing; the sends fail at some point, the pages
	// are recorded as owed either way.
	var sendErr error
	for i := 3; i < 6 && sendErr == nil; i++ {
		sendErr = sendExtents(t, s, f, scribble(t, f, i))
		if sendErr == nil {
			sendErr = s.Flush(context.Background())
		}
	}
	if _, err := s.Commit(context.Background(), false); err == nil {
		t.Fatal("commit succeeded with the server dead")
	} else if !errors.Is(err, backupclient.ErrBroken) {
		t.Fatalf("commit error does not wrap ErrBroken: %v", err)
	} else {
		t.Logf("commit with dead server: %v", err)
	}
	if err := s.Reconnect(context.Background()); err == nil {
		t.Fatal("reconnect to a dead server succeeded")
	}
	srv, _ = spawnServer(t, pkiDir, storeDir, addr)
	if err := s.Reconnect(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Acked != 1 || st.PendingPages == 0 {
		t.Fatalf("after reconnect %+v, want acked 1 and pages resent", st)
	}
	if err := s.SendDeviceState(context.Background(), []byte("final state")); err != nil {
		t.Fatal(err)
	}
	if ep, err := s.Commit(context.Background(), true); err != nil || ep != 2 {
		t.Fatalf("commit after resync: %d %v", ep, err)
	}
	s.Close()
	srv.Process.Signal(syscall.SIGKILL)
	srv.Wait()
	checkStore(t, storeDir, "vm1", f, "final state")
}

// TestClientDiesMidEpoch: a host that vanishes in the middle of an epoch
// (connection cut after some extents) leaves the committed epoch as it was;
// its next session starts after it.
func TestClientDiesMidEpoch(t *testing.T) {
	e := newEnv(t)
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	s.SendPages(context.Background(), 0, full)
	if _, err := s.Commit(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	s.Close()
	conn, _ := rawSession(t, e, "vm1")
	page := bytes.Repeat([]byte{0xee}, 4096)
	ext, _ := wire.AppendFrame(nil, &wire.Extent{Epoch: 2, Offset: 0, CRC: wire.Checksum(page), Data: page})
	conn.Write(ext)
	conn.Write(ext[:100]) // and dies half way through a frame
	conn.Close()
	s2 := e.client(t, "vm1", f)
	if st := s2.Stats(); st.Acked != 1 || st.Epoch != 2 {
		t.Fatalf("after a dead client: %+v", st)
	}
	s2.Close()
	e.stop()
	checkStore(t, e.store, "vm1", f, "")
}

// TestBackupDiskFull: the backup's disk fills in the middle of an epoch.
// The host's commit fails with the server's no-space error, the committed
// epoch is intact, and after space is freed a reconnect resyncs and
// commits.
func TestBackupDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	mnt := t.TempDir()
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=24m"); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(mnt, syscall.MNT_DETACH)
	e := &env{pki: newPKI(t), store: mnt}
	e.addr, e.stop = startServer(t, e.pki, e.store, "127.0.0.1:0")
	defer func() { e.stop() }()
	f := ramFile(t)
	s := e.client(t, "vm1", f)
	defer s.Close()
	if err := sendExtents(t, s, f, scribble(t, f, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	var st syscall.Statfs_t
	syscall.Statfs(mnt, &st)
	ballast := filepath.Join(mnt, "ballast")
	if err := os.WriteFile(ballast, make([]byte, int64(st.Bavail)*st.Bsize-(1<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	full := make([]byte, imgSize)
	f.ReadAt(full, 0)
	s.SendPages(context.Background(), 0, full)
	_, err := s.Commit(context.Background(), false)
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wire.CodeNoSpace {
		t.Fatalf("commit on a full backup: %v, want a no-space error", err)
	}
	t.Logf("full backup: %v", err)
	os.Remove(ballast)
	if err := s.Reconnect(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.SendDeviceState(context.Background(), []byte("after disk full")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	s.Close()
	e.stop()
	e.stop = func() {}
	checkStore(t, e.store, "vm1", f, "after disk full")
}
