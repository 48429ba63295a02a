// Package repo is the page repository of cooperative swap (the `repo`
// role, issue 6; Overdriver's page repositories): a Server lends a fixed
// amount of locked anonymous memory to other hosts' swap devices over
// mutual TLS 1.3, and a Client is one swap device's session with it.
//
// Model. Memory is cut into 4 KiB pages. Put stores pages and returns one
// Cap per page: 128 bits from crypto/rand that the server keeps in the
// storing session's map, so a capability is only valid for the session
// (client certificate common name + the 128-bit session id of its Hello)
// that stored it; a forged capability, or one of another client or
// session, reads as absent. Get, Free take capabilities. A quota per
// client identity (common name) bounds its pages; Put past it, or past the
// capacity, fails with ErrFull and the client keeps the page on its disk.
// Reclaim: Server.Reclaim asks a client for bytes back; the client's
// OnReclaim moves pages to its disk, Frees them, and answers.
//
// Sessions and failures. A Client reconnects by itself; its session
// survives reconnections (pages kept), and a session left without a
// connection is freed after ServerOptions.OrphanTimeout (2 min), so a host
// that died leaks nothing. A restarted server has lost every page: its
// Welcome carries a new instance id and old capabilities read as absent.
// None of this loses data, because the swap device writes every page
// through to its local disk too (dataplane/swapdev).
//
// Wire: frames of a 4-byte big-endian length and a body (type byte +
// payload), Hello/Welcome first, version checked; Decode checks every
// count, length and trailing byte (FuzzDecode, FuzzReadFrame). Requests
// carry ids and may be pipelined; the server answers in order.
//
// Wiring (hostd, repo role):
//
//	tlsConf, _ := pki.ServerConfig(ca, cert, key)
//	srv, _ := repo.NewServer(tlsConf, repo.ServerOptions{Capacity: 8 << 30, DefaultQuota: 2 << 30, Logger: log})
//	ln, _ := net.Listen("tcp", ":7011")
//	go srv.Serve(ctx, ln)   // returns when ctx ends; then srv.Close() frees the memory
//	srv.Status()            // GET /v1/repo: capacity, used, per-client use
//	srv.Reclaim(ctx, "host-b", 1<<30)
//
// Host side, one Client per swap device and repository (swapdev.Open
// makes them from swapdev.RepoConfig):
//
//	c, _ := repo.NewClient(repo.ClientConfig{Addr: "10.0.0.5:7011", TLS: clientTLS, OnReclaim: dev.Reclaim})
//
// The repo server's TLS certificate comes from checkpoint/pki like the
// backup server's; hosts use their client certificates, whose common name
// is the quota key. repotest starts real servers for tests.
package repo
