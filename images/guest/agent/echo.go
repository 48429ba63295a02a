package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"

	"hostd/images/guest/agentapi"
)

// echoServer echoes TCP streams and UDP datagrams on one port, for network
// tests that need a peer inside the guest.
type echoServer struct {
	port uint16
	tcp  net.Listener
	udp  net.PacketConn

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func (a *agent) echoCmd(args agentapi.EchoArgs) (agentapi.EchoResult, error) {
	if args.Action == "start" {
		return a.startEcho(args.Port)
	}
	a.mu.Lock()
	e := a.echo
	a.echo = nil
	a.mu.Unlock()
	if e != nil {
		e.close()
	}
	return agentapi.EchoResult{Running: false}, nil
}

func (a *agent) startEcho(port uint16) (agentapi.EchoResult, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.echo != nil {
		if a.echo.port == port {
			return agentapi.EchoResult{Running: true, Port: port}, nil
		}
		return agentapi.EchoResult{}, fmt.Errorf("echo start %d: already serving port %d; stop it first", port, a.echo.port)
	}
	addr := net.JoinHostPort("", strconv.Itoa(int(port)))
	tl, err := net.Listen("tcp", addr)
	if err != nil {
		return agentapi.EchoResult{}, fmt.Errorf("echo start %d: %w", port, err)
	}
	ul, err := net.ListenPacket("udp", addr)
	if err != nil {
		tl.Close()
		return agentapi.EchoResult{}, fmt.Errorf("echo start %d: %w", port, err)
	}
	e := &echoServer{port: port, tcp: tl, udp: ul, conns: map[net.Conn]struct{}{}}
	e.wg.Add(2)
	go e.serveTCP()
	go e.serveUDP()
	a.echo = e
	return agentapi.EchoResult{Running: true, Port: port}, nil
}

func (e *echoServer) serveTCP() {
	defer e.wg.Done()
	for {
		c, err := e.tcp.Accept()
		if err != nil {
			return // closed by stop
		}
		e.mu.Lock()
		e.conns[c] = struct{}{}
		e.mu.Unlock()
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			_, _ = io.Copy(c, c)
			c.Close()
			e.mu.Lock()
			delete(e.conns, c)
			e.mu.Unlock()
		}()
	}
}

func (e *echoServer) serveUDP() {
	defer e.wg.Done()
	buf := make([]byte, 64*1024)
	for {
		n, from, err := e.udp.ReadFrom(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue // e.g. ICMP-induced errors; keep serving
		}
		_, _ = e.udp.WriteTo(buf[:n], from)
	}
}

func (e *echoServer) close() {
	e.tcp.Close()
	e.udp.Close()
	e.mu.Lock()
	for c := range e.conns {
		c.Close()
	}
	e.mu.Unlock()
	e.wg.Wait()
}
