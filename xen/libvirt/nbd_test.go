package libvirt

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"hostd/xen"
)

// nbdServer is the smallest NBD server QEMU's client accepts (fixed
// newstyle handshake, NBD_OPT_GO, simple replies) over a byte slice, for
// testing the NBD-over-unix-socket disk attachment with real guest I/O.
type nbdServer struct {
	ln     net.Listener
	mu     sync.Mutex
	data   []byte
	reads  atomic.Int64
	writes atomic.Int64
	wg     sync.WaitGroup
}

const (
	nbdOptMagic      = 0x49484156454F5054 // "IHAVEOPT"
	nbdRepMagic      = 0x3e889045565a9
	nbdReqMagic      = 0x25609513
	nbdSimpleReply   = 0x67446698
	nbdOptAbort      = 2
	nbdOptGo         = 7
	nbdRepAck        = 1
	nbdRepInfo       = 3
	nbdRepErrUnsup   = 1<<31 + 1
	nbdFlagHasFlags  = 1 << 0
	nbdFlagSendFlush = 1 << 2
	nbdCmdRead       = 0
	nbdCmdWrite      = 1
	nbdCmdDisc       = 2
	nbdCmdFlush      = 3
	nbdEINVAL        = 22
)

func startNBD(t *testing.T, path string, size int) *nbdServer {
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := &nbdServer{ln: ln, data: make([]byte, size)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				if err := s.serve(c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
					t.Logf("nbd: %v", err)
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *nbdServer) serve(c net.Conn) error {
	be := binary.BigEndian
	// Handshake: fixed newstyle, no zeroes.
	hello := make([]byte, 18)
	copy(hello, "NBDMAGIC")
	be.PutUint64(hello[8:], nbdOptMagic)
	be.PutUint16(hello[16:], 1|2)
	if _, err := c.Write(hello); err != nil {
		return err
	}
	var clientFlags uint32
	if err := binary.Read(c, be, &clientFlags); err != nil {
		return err
	}
	reply := func(opt, typ uint32, data []byte) error {
		b := make([]byte, 20+len(data))
		be.PutUint64(b, nbdRepMagic)
		be.PutUint32(b[8:], opt)
		be.PutUint32(b[12:], typ)
		be.PutUint32(b[16:], uint32(len(data)))
		copy(b[20:], data)
		_, err := c.Write(b)
		return err
	}
	for negotiated := false; !negotiated; {
		var hdr struct {
			Magic uint64
			Opt   uint32
			Len   uint32
		}
		if err := binary.Read(c, be, &hdr); err != nil {
			return err
		}
		if hdr.Magic != nbdOptMagic || hdr.Len > 4096 {
			return fmt.Errorf("bad option header %+v", hdr)
		}
		if _, err := io.CopyN(io.Discard, c, int64(hdr.Len)); err != nil {
			return err
		}
		switch hdr.Opt {
		case nbdOptGo:
			info := make([]byte, 12)
			be.PutUint16(info, 0) // NBD_INFO_EXPORT
			be.PutUint64(info[2:], uint64(len(s.data)))
			be.PutUint16(info[10:], nbdFlagHasFlags|nbdFlagSendFlush)
			if err := reply(hdr.Opt, nbdRepInfo, info); err != nil {
				return err
			}
			if err := reply(hdr.Opt, nbdRepAck, nil); err != nil {
				return err
			}
			negotiated = true
		case nbdOptAbort:
			return reply(hdr.Opt, nbdRepAck, nil)
		default: // structured replies, meta contexts, ...: not offered
			if err := reply(hdr.Opt, nbdRepErrUnsup, nil); err != nil {
				return err
			}
		}
	}
	for {
		var req struct {
			Magic  uint32
			Flags  uint16
			Type   uint16
			Handle uint64
			Offset uint64
			Len    uint32
		}
		if err := binary.Read(c, be, &req); err != nil {
			return err
		}
		if req.Magic != nbdReqMagic {
			return fmt.Errorf("bad request magic %#x", req.Magic)
		}
		out := make([]byte, 16)
		be.PutUint32(out, nbdSimpleReply)
		be.PutUint64(out[8:], req.Handle)
		inRange := req.Offset+uint64(req.Len) <= uint64(len(s.data))
		switch req.Type {
		case nbdCmdRead:
			if !inRange {
				be.PutUint32(out[4:], nbdEINVAL)
				if _, err := c.Write(out); err != nil {
					return err
				}
				continue
			}
			s.reads.Add(1)
			s.mu.Lock()
			out = append(out, s.data[req.Offset:req.Offset+uint64(req.Len)]...)
			s.mu.Unlock()
		case nbdCmdWrite:
			buf := make([]byte, req.Len)
			if _, err := io.ReadFull(c, buf); err != nil {
				return err
			}
			if inRange {
				s.writes.Add(1)
				s.mu.Lock()
				copy(s.data[req.Offset:], buf)
				s.mu.Unlock()
			} else {
				be.PutUint32(out[4:], nbdEINVAL)
			}
		case nbdCmdFlush:
		case nbdCmdDisc:
			return nil
		default:
			be.PutUint32(out[4:], nbdEINVAL)
		}
		if _, err := c.Write(out); err != nil {
			return err
		}
	}
}

// TestNBDDisk attaches an NBD export over a unix socket (the attachment the
// swap device uses) and checks that the guest's kernel really reads it.
func TestNBDDisk(t *testing.T) {
	g := testGuest(t)
	d := newTestDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	dir := shortTempDir(t)
	const size = 16 << 20
	srv := startNBD(t, filepath.Join(dir, "nbd.sock"), size)
	name := uniqueName(t)
	spec := guestSpec(t, g, name, dir)
	spec.Disks = []xen.Disk{{NBDSocket: filepath.Join(dir, "nbd.sock"), NBDExport: "swap0"}}
	cleanupDomain(t, d, name)
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	if err := d.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitSerial(t, spec.SerialLog, "HOSTD-AGENT READY", 1, bootTimeout)
	serial, _ := os.ReadFile(spec.SerialLog)
	want := fmt.Sprintf("[vda] %d 512-byte logical blocks", size/512)
	if !strings.Contains(string(serial), want) {
		t.Errorf("serial log lacks %q:\n%s", want, lastLines(serial, 30))
	}
	// The kernel reads the partition table at probe time.
	if srv.reads.Load() == 0 {
		t.Errorf("the guest never read from the NBD export")
	}
	t.Logf("nbd: %d reads, %d writes", srv.reads.Load(), srv.writes.Load())
	if err := d.Destroy(ctx, name); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
}
