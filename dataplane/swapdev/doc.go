// Package swapdev is a VM's cooperative swap device (Overdriver, issue 6):
// an nbd.Backend whose 4 KiB pages live in the spare memory of peer hosts
// (dataplane/repo repositories) and, written through asynchronously, in a
// local file, so that losing a peer loses nothing.
//
// Write: local blocks for the pages are reserved first (fallocate: a full
// disk fails the write with ENOSPC before anything changed), a copy is
// queued for the local file (the queue is bounded; a page waiting there is
// read from the queue), the pages are put in the connected repository with
// the most room (round robin among equals) and the write returns. A
// repository that is down, full or slow (RemoteTimeout) leaves the pages
// local only. Superseded capabilities are freed in the background. FUA and
// Flush wait for the local copy and fdatasync it.
//
// Read: queue first, then the repository, then the local file when the
// repository is unreachable or no longer has the page (restarted,
// reclaimed, or a capability it refuses); such pages are marked local only.
// Trim forgets whole pages everywhere and punches a hole in the file, in
// order with the queued writes. Partial (512-byte aligned) pages are
// read-modify-written under the page's lock.
//
// Reclaim: when a repository asks for memory back, the device makes its
// local copy durable, frees pages there and reads them locally from then
// on. A local write failure (EIO) makes the device refuse writes (EIO to
// the guest) while every acknowledged page stays readable.
//
// Wiring (hostd, PUT /v1/vms/{id}/swap {size, repos}):
//
//	dev, _ := swapdev.Open(ctx, swapdev.Config{Path: vmDir + "/swap.img", Size: size,
//		Repos: []swapdev.RepoConfig{{Addr: "10.0.0.5:7011", TLS: hostClientTLS}}, Logger: log})
//	srv, _ := nbd.NewServer(dev, nbd.Options{Logger: log})
//	ln, _ := net.Listen("unix", vmDir+"/swap.sock")
//	go srv.Serve(ctx, ln)          // QEMU: <disk type='network'> ... protocol='nbd' unix socket
//	dev.Stats()                    // GET .../swap: pages remote/local, ops/s, latency histograms, repo health
//	// every 10 s: overload.Policy.Observe(Sample{Ops: delta of pages read and written})
//	// teardown: cancel Serve, dev.Close(), remove the file
//
// A hostd restart under a running VM: QEMU reconnects if its nbd blockdev
// has reconnect-delay set; reopen with Reuse so the file's content is
// served (the repositories' copies are then forgotten, their sessions
// reaped by the repositories). Pages still queued at a crash are lost, as
// with any volatile write cache; Flush bounds that.
//
// FileBackend is the plain local-file nbd.Backend that the benchmarks
// compare against.
package swapdev
