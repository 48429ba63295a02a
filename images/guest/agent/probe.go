package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"hostd/images/guest/agentapi"
)

// maxStaleEchoes bounds how many datagrams one UDP probe skips while it
// waits for its own echo: late echoes of earlier probes, or strangers.
const maxStaleEchoes = 1000

// probe sends args.Count echo requests to args.Addr and measures the
// answers. It runs on the request's goroutine, so the port waits for it;
// DecodeRequest has bounded its worst case (MaxProbeTotalMS). Probes that
// go unanswered are counted, not errors: connectivity is what is measured.
// Only a probe that cannot start at all (no route, no socket) is an error.
func probe(ctx context.Context, args agentapi.ProbeArgs) (agentapi.ProbeResult, error) {
	res := agentapi.ProbeResult{Addr: args.Addr, Proto: args.Proto, Size: args.Size}
	var nonce [8]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return res, fmt.Errorf("probe %s: random nonce: %w", args.Addr, err)
	}
	p := &prober{args: args, res: &res, nonce: nonce,
		timeout: time.Duration(args.TimeoutMS) * time.Millisecond}
	start := time.Now()
	var err error
	if args.Proto == "udp" {
		err = p.runUDP(ctx)
	} else {
		err = p.runTCP(ctx)
	}
	res.ElapsedMS = uint64(time.Since(start).Milliseconds())
	res.Lost = res.Sent - res.Received
	if len(p.rtts) > 0 {
		slices.Sort(p.rtts)
		res.RTTUsMin = us(p.rtts[0])
		res.RTTUsP50 = us(percentile(p.rtts, 50))
		res.RTTUsP90 = us(percentile(p.rtts, 90))
		res.RTTUsMax = us(p.rtts[len(p.rtts)-1])
	}
	return res, err
}

type prober struct {
	args    agentapi.ProbeArgs
	res     *agentapi.ProbeResult
	nonce   [8]byte
	timeout time.Duration
	rtts    []time.Duration
}

// payload is probe seq's contents: the run's nonce, seq, then bytes that
// depend on seq, so an echo of another probe or of another run never
// matches.
func (p *prober) payload(seq uint32) []byte {
	b := make([]byte, p.args.Size)
	copy(b, p.nonce[:])
	binary.BigEndian.PutUint64(b[8:], uint64(seq))
	for i := 16; i < len(b); i++ {
		b[i] = byte(uint32(i)*7 + seq)
	}
	return b
}

func (p *prober) lose(err error) {
	if err != nil {
		p.res.LastError = err.Error()
	}
}

// pause waits the interval after a probe (none after the last one).
func (p *prober) pause(ctx context.Context, seq uint32) error {
	if p.args.IntervalMS == 0 || seq+1 == p.args.Count {
		return ctx.Err()
	}
	t := time.NewTimer(time.Duration(p.args.IntervalMS) * time.Millisecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (p *prober) runUDP(ctx context.Context) error {
	raddr, err := net.ResolveUDPAddr("udp", p.args.Addr)
	if err != nil {
		return fmt.Errorf("probe %s: %w", p.args.Addr, err)
	}
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		return fmt.Errorf("probe %s: open udp socket: %w", p.args.Addr, err)
	}
	defer conn.Close()
	p.res.LocalAddr = conn.LocalAddr().String()
	p.res.PathMTU = pathMTU(conn, raddr.IP)
	buf := make([]byte, p.args.Size+1) // one more: a longer echo is a mismatch
	for seq := uint32(0); seq < p.args.Count; seq++ {
		want := p.payload(seq)
		p.res.Sent++
		start := time.Now()
		if _, err := conn.Write(want); err != nil {
			p.lose(fmt.Errorf("send probe %d: %w", seq, err))
		} else {
			_ = conn.SetReadDeadline(start.Add(p.timeout))
			p.awaitUDP(conn, seq, want, buf, start)
		}
		if err := p.pause(ctx, seq); err != nil {
			return fmt.Errorf("probe %s: %w", p.args.Addr, err)
		}
	}
	return nil
}

// awaitUDP reads until probe seq's echo arrives or the deadline passes.
func (p *prober) awaitUDP(conn *net.UDPConn, seq uint32, want, buf []byte, start time.Time) {
	for range maxStaleEchoes {
		n, err := conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				p.lose(fmt.Errorf("probe %d: no echo within %s", seq, p.timeout))
				return
			}
			// An ICMP error (port unreachable) is reported once on
			// a connected socket; keep waiting until the deadline.
			p.lose(fmt.Errorf("probe %d: %w", seq, err))
			continue
		}
		got := buf[:n]
		if bytes.Equal(got, want) {
			p.rtts = append(p.rtts, time.Since(start))
			p.res.Received++
			return
		}
		if n >= 16 && bytes.Equal(got[:16], want[:16]) {
			p.res.Mismatched++
			p.lose(fmt.Errorf("probe %d: echo of %d bytes differs from the %d sent", seq, n, len(want)))
			return
		}
		// A late echo of an earlier probe: skip it.
	}
	p.lose(fmt.Errorf("probe %d: gave up after %d stale datagrams", seq, maxStaleEchoes))
}

func (p *prober) runTCP(ctx context.Context) error {
	var conn net.Conn
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	buf := make([]byte, p.args.Size)
	for seq := uint32(0); seq < p.args.Count; seq++ {
		want := p.payload(seq)
		p.res.Sent++
		deadline := time.Now().Add(p.timeout)
		if conn == nil {
			// A lost probe leaves the stream out of step (its echo may
			// still come), so every loss is followed by a new connection.
			d := net.Dialer{Deadline: deadline}
			c, err := d.DialContext(ctx, "tcp", p.args.Addr)
			if err != nil {
				p.lose(fmt.Errorf("probe %d: connect: %w", seq, err))
			} else {
				conn = c
				p.res.Connects++
				p.res.LocalAddr = c.LocalAddr().String()
				if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
					p.res.PathMTU = pathMTU(c.(*net.TCPConn), ta.IP)
				}
			}
		}
		if conn != nil && !p.exchangeTCP(conn, seq, want, buf, deadline) {
			conn.Close()
			conn = nil
		}
		if err := p.pause(ctx, seq); err != nil {
			return fmt.Errorf("probe %s: %w", p.args.Addr, err)
		}
	}
	return nil
}

// exchangeTCP writes one probe and reads its echo back. The write runs
// beside the read: a probe larger than the socket buffers would otherwise
// deadlock against the echo server writing back. It reports whether the
// connection is still in step.
func (p *prober) exchangeTCP(conn net.Conn, seq uint32, want, buf []byte, deadline time.Time) bool {
	_ = conn.SetDeadline(deadline)
	start := time.Now()
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(want)
		werr <- err
	}()
	_, rerr := io.ReadFull(conn, buf)
	rtt := time.Since(start)
	if rerr != nil {
		conn.Close() // unblocks the writer
	}
	if err := <-werr; err != nil && rerr == nil {
		rerr = err
	}
	switch {
	case rerr != nil:
		p.lose(fmt.Errorf("probe %d: %w", seq, rerr))
		return false
	case !bytes.Equal(buf, want):
		p.res.Mismatched++
		p.lose(fmt.Errorf("probe %d: echo differs from the %d bytes sent", seq, len(want)))
		return false
	}
	p.rtts = append(p.rtts, rtt)
	p.res.Received++
	return true
}

// pathMTU is the kernel's MTU towards the peer of a connected socket (0 if
// it cannot be read): the largest packet the guest's stack sends there
// without fragmenting, normally its eth0 MTU.
func pathMTU(c syscall.Conn, peer net.IP) int {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	level, opt := unix.IPPROTO_IP, unix.IP_MTU
	if peer.To4() == nil {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_MTU
	}
	mtu := 0
	_ = rc.Control(func(fd uintptr) {
		if v, err := unix.GetsockoptInt(int(fd), level, opt); err == nil {
			mtu = v
		}
	})
	return mtu
}

// percentile is the nearest-rank percentile of sorted durations.
func percentile(sorted []time.Duration, pct int) time.Duration {
	i := (len(sorted)*pct + 99) / 100
	return sorted[max(i-1, 0)]
}

func us(d time.Duration) uint64 { return uint64(d.Microseconds()) }
