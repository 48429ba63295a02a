//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// VirtualWire connectors as TC programs. The maps below are the contract
// with the Go side (hostd/dataplane): Go writes endpoints and deliveries,
// the kernel writes counters.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual BSD/GPL";

// Endpoint flags.
#define EP_COLLAPSE 1 // both ends on this host: redirect tap to tap, no VXLAN
#define EP_IPV6 2     // the underlay is IPv6

// One entry per local endpoint device, keyed by its ifindex.
struct endpoint {
	__u32 id;           // connector id, carried as the VNI
	__u32 flags;        // EP_*
	__u32 peer_ifindex; // EP_COLLAPSE: the other local endpoint
	__u32 _pad;
	__u8 remote[16];    // peer host's underlay address, network order (IPv4 in the first 4 bytes)
	__u8 local[16];     // this host's underlay address, same layout
};

// Per-connector counters, per CPU so the fast path needs no atomics.
struct counters {
	__u64 tx_packets; // frames taken from a local endpoint into the connector
	__u64 tx_bytes;
	__u64 rx_packets; // frames delivered to a local endpoint
	__u64 rx_bytes;
	__u64 drops;      // frames of this connector the host could not deliver
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); // ifindex of the local endpoint device
	__type(value, struct endpoint);
} endpoints SEC(".maps");

// One entry per connector with a remote end, keyed by VNI = connector id.
struct delivery {
	__u32 ifindex;   // the local endpoint device
	__u32 flags;     // EP_IPV6
	__u8 remote[16]; // the one host that may send on this connector
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct delivery);
} deliveries SEC(".maps");

// LRU so that frames for connectors this host does not (yet) know, which
// are counted too, can never fill the map.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); // connector id
	__type(value, struct counters);
} counters SEC(".maps");

// Set by the loader: the host's VXLAN device in external mode.
volatile const __u32 vxlan_ifindex = 0;

enum dir { TX, RX, DROP };

static __always_inline void count(__u32 id, enum dir d, __u64 bytes)
{
	struct counters *c = bpf_map_lookup_elem(&counters, &id);
	if (!c) {
		struct counters zero = {};
		bpf_map_update_elem(&counters, &id, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&counters, &id);
		if (!c)
			return;
	}
	switch (d) {
	case TX:
		c->tx_packets++;
		c->tx_bytes += bytes;
		break;
	case RX:
		c->rx_packets++;
		c->rx_bytes += bytes;
		break;
	case DROP:
		c->drops++;
		break;
	}
}

// Attached to ingress of every local endpoint device: a frame the VM
// sent. The whole frame (MAC header, VLAN tag) is carried untouched.
SEC("tc")
int endpoint_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (!ep)
		// The device is ours but its connector is being torn down: a
		// VM's frames must never leak into the host's stack.
		return TC_ACT_SHOT;

	__u64 len = skb->len;
	if (ep->flags & EP_COLLAPSE) {
		count(ep->id, TX, len);
		count(ep->id, RX, len);
		return bpf_redirect(ep->peer_ifindex, 0);
	}

	struct bpf_tunnel_key key = {};
	__u64 flags = 0;
	key.tunnel_id = ep->id;
	key.tunnel_ttl = 64;
	if (ep->flags & EP_IPV6) {
		__builtin_memcpy(key.remote_ipv6, ep->remote, 16);
		__builtin_memcpy(key.local_ipv6, ep->local, 16);
		flags = BPF_F_TUNINFO_IPV6;
	} else {
		__u32 a;
		__builtin_memcpy(&a, ep->remote, 4);
		key.remote_ipv4 = bpf_ntohl(a);
		__builtin_memcpy(&a, ep->local, 4);
		key.local_ipv4 = bpf_ntohl(a);
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags) < 0) {
		count(ep->id, DROP, 0);
		return TC_ACT_SHOT;
	}
	count(ep->id, TX, len);
	return bpf_redirect(vxlan_ifindex, 0);
}

// A connector is point to point: only its peer host may send on it, so a
// stale or misconfigured host cannot inject frames into it.
static __always_inline int from_peer(const struct bpf_tunnel_key *key, const struct delivery *dl, int v6)
{
	__u32 w[4];
	if (!v6) {
		__builtin_memcpy(w, dl->remote, 4);
		return bpf_ntohl(w[0]) == key->remote_ipv4;
	}
	__builtin_memcpy(w, dl->remote, 16);
	return w[0] == key->remote_ipv6[0] && w[1] == key->remote_ipv6[1] &&
	       w[2] == key->remote_ipv6[2] && w[3] == key->remote_ipv6[3];
}

// Attached to ingress of the host's VXLAN device: a decapsulated frame with
// its VNI and outer source in the tunnel metadata.
SEC("tc")
int vxlan_ingress(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	int v6 = 0;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0) {
		if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6) < 0)
			return TC_ACT_SHOT;
		v6 = 1;
	}

	__u32 id = key.tunnel_id;
	struct delivery *dl = bpf_map_lookup_elem(&deliveries, &id);
	if (!dl || !from_peer(&key, dl, v6)) {
		// Unknown here, typically in flight while an endpoint moves,
		// or from a host that is not the peer. Counted under the id,
		// so a move's loss shows once the connector is created.
		count(id, DROP, 0);
		return TC_ACT_SHOT;
	}
	count(id, RX, skb->len);
	return bpf_redirect(dl->ifindex, 0);
}
