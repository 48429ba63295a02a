// Package agentapi defines, once, the protocol between hostd (host side) and
// the guest agent that runs inside every nested test guest
// (images/guest/agent). Both sides import it: the agent to parse requests and
// fill memory, the host-side client (images/guest/agentclient) to build
// requests and to recompute, without the guest, what a guest region must
// contain.
//
// # Transport
//
// A virtio-serial port named "org.hostd.agent.0" (PortName). QEMU exposes
// the host end as a unix socket it listens on. Traffic is newline-delimited
// JSON: the host writes one Request per line, the agent answers each with one
// Response line, in order. The agent also prints every response on the
// serial console, prefixed by ResultPrefix, so a serial log tells the story
// of a test.
//
// # Requests and responses
//
//	{"id":7,"cmd":"dirty","args":{"region":"a","size_mib":16,"rate_mib_s":0,"seed":42,"passes":1}}
//	{"id":7,"ok":true,"result":{"region":"a","size_mib":16,"pages":4096,...}}
//	{"id":8,"cmd":"nope"}
//	{"id":8,"ok":false,"error":"decode request: unknown command \"nope\""}
//
// id is chosen by the host and echoed back (0 if the line could not be
// parsed at all). args is an object whose shape depends on cmd (the *Args
// types below; unknown fields are rejected); result is the matching *Result
// type. Commands: ping, dirty, stop, checksum, expected, ops, echo,
// probe, meminfo, stats.
//
// probe has the guest itself send count echo requests of size bytes, one
// after another, to an echo server (another guest's hostd.echo) and report
// sent, received, lost and round-trip percentiles; it is how a test checks
// a network path between two guests from inside them:
//
//	{"id":9,"cmd":"probe","args":{"addr":"10.0.0.2:7","proto":"udp","count":20,"interval_ms":10,"timeout_ms":1000,"size":64}}
//	{"id":9,"ok":true,"result":{"sent":20,"received":20,"lost":0,"rtt_us_p50":850,"path_mtu":1450,...}}
//
// A probe waits timeout_ms for its echo and then interval_ms before the
// next one; requests are answered in order, so the port is busy for up to
// count*(interval_ms+timeout_ms), which is capped (MaxProbeTotalMS). Lost
// probes are counted, not errors. A TCP probe writes size bytes on one
// connection and reads them back; after a loss it reconnects.
//
// # Readiness
//
// Once configured, the agent prints one line on the serial console:
//
//	HOSTD-AGENT READY uptime_ms=2345 kernel=6.1.0-56-cloud-amd64 ip=10.0.2.15/24 port=/dev/vport1p1 version=1
//
// fields are key=value separated by spaces (ReadyPrefix, ParseReady).
//
// # Boot-time options (kernel command line)
//
//	hostd.ip=CIDR        address for eth0 (link brought up)
//	hostd.echo=PORT      start the TCP+UDP echo server on PORT
//	hostd.run=CMD,k=v,.. a command run at boot, e.g.
//	                     hostd.run=dirty,region=boot,size_mib=8,seed=1,passes=0
//	                     (same command and argument names as the JSON form;
//	                     may be repeated)
//
// # The memory pattern
//
// A dirty workload owns a region of Pages = size_mib*256 pages of PageSize
// bytes, zero when created. Pass p (0, 1, 2, ...) writes pages 0..Pages-1 in
// order; page i of pass p is 512 little-endian uint64 words w_0..w_511 drawn
// from SplitMix64 started at state PageSeed(seed, p, i):
//
//	PageSeed = seed*0x9E3779B97F4A7C15 ^ (p+1)*0xBF58476D1CE4E5B9 ^ (i+1)*0x94D049BB133111EB
//	state += 0x9E3779B97F4A7C15; z := state
//	z = (z ^ z>>30) * 0xBF58476D1CE4E5B9; z = (z ^ z>>27) * 0x94D049BB133111EB
//	w_k = z ^ z>>31
//
// A region whose writer has completed P passes and is K pages into pass P
// holds pass P in pages [0, K) and pass P-1 (zeros when P is 0) in pages
// [K, Pages). ExpectedChecksum computes the SHA-256 of such a region; the
// checksum command reports P and K with the hash, taken while the writer is
// held between pages, so the two always agree.
package agentapi
