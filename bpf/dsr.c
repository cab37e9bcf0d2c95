// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* vipd's DSR director: a tc ingress program (direct action).
 *
 * A frame to VIP:port of a configured service (TCP or UDP, IPv4 or IPv6) is hashed on its 5-tuple
 * (MurmurHash3 x86_32, seed FLOW_SEED: vipd/dsr/maglev.py is the byte-exact reference), the hash
 * picks a slot of the service's Maglev table, the slot names a backend; the destination MAC becomes
 * the backend's, the source MAC this interface's, and the frame leaves by the interface it came in
 * on (bpf_redirect). A backend flagged local (this host serves too) is delivered up the stack.
 *
 * Everything else passes untouched (TC_ACT_OK), counted by reason: non-IP (ARP ...), VLAN-tagged
 * frames, truncated or malformed headers, protocols other than TCP/UDP (ICMP ...), IPv6 extension
 * headers, every fragment (first or not: a non-first fragment carries no ports, so the pieces of one
 * datagram could not be kept together), addresses/ports without a service, frames from a peer
 * (source MAC of a known backend: already directed once, never direct twice).
 *
 * The lease-bound fence: each VIP directs only while armed with a deadline in the future (vipd
 * refreshes it with each lease proof; a dead vipd stops directing by itself). Unarmed or expired, a
 * service's frames go up the stack on a host that is one of its backends, and are dropped elsewhere.
 *
 * Table updates are atomic: each service has two table halves; vipd writes the inactive one, then
 * flips `active` with one map update.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TABLE_SIZE 65537
#define MAX_SERVICES 16
#define MAX_BACKENDS 256
#define EMPTY 0xffffffffu
#define FLOW_SEED 0x56495044u

enum reason {
	R_DIRECTED = 0,
	R_LOCAL,          /* the chosen backend is this host: up the stack */
	R_PASS_NOT_IP,    /* ARP, other ethertypes */
	R_PASS_VLAN,      /* VLAN-tagged: not supported, untouched */
	R_PASS_TRUNCATED, /* too short or malformed headers */
	R_PASS_PROTO,     /* not TCP/UDP (ICMP ...), or IPv6 extension headers */
	R_PASS_FRAGMENT,  /* any fragment */
	R_PASS_NO_SERVICE,
	R_PASS_PEER,      /* from a backend's MAC: already directed */
	R_PASS_NOT_ARMED, /* VIP not armed here, and this host is one of the service's backends */
	R_PASS_EXPIRED,   /* deadline passed, and this host is one of the service's backends */
	R_DROP_NO_BACKEND,
	R_DROP_NO_IFACE,  /* this interface's MAC unknown */
	R_DROP_FENCED,    /* not armed or deadline passed, and this host is no backend: never answer with RST */
	R_MAX,
};

struct svc_key {
	__u8 addr[16]; /* IPv4: first 4 bytes, rest zero */
	__u16 port;    /* network order */
	__u8 proto;
	__u8 family;   /* 4 or 6 */
};

#define SVC_SELF_BACKEND 1 /* this host is one of the service's backends */

struct svc_val {
	__u32 id;     /* 0..MAX_SERVICES-1 */
	__u32 active; /* table half in use: 0 or 1 */
	__u32 flags;  /* SVC_* */
};

struct vip_key {
	__u8 addr[16];
	__u32 family;
};

struct backend {
	__u8 mac[6];
	__u8 local;
	__u8 valid;
};

struct iface {
	__u8 mac[6];
	__u8 pad[2];
};

struct traffic {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES * 2 * TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct traffic);
} backend_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_MAX);
	__type(key, __u32);
	__type(value, __u64);
} reasons SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct vip_key);
	__type(value, __u64); /* deadline, CLOCK_MONOTONIC ns */
} fence SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32); /* ifindex */
	__type(value, struct iface);
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u64); /* MAC in the low 6 bytes (memory order) */
	__type(value, __u8);
} peers SEC(".maps");

static __always_inline int count(__u32 r, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&reasons, &r);

	if (c)
		*c += 1;
	return verdict;
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* MurmurHash3 x86_32 over n little-endian words (vipd/dsr/maglev.py: murmur3_32). */
static __always_inline __u32 murmur3(const __u32 *w, int n)
{
	__u32 h = FLOW_SEED;
	int i;

#pragma unroll
	for (i = 0; i < 10; i++) {
		__u32 k;

		if (i >= n)
			break;
		k = w[i] * 0xcc9e2d51u;
		k = rotl32(k, 15);
		k *= 0x1b873593u;
		h ^= k;
		h = rotl32(h, 13);
		h = h * 5 + 0xe6546b64u;
	}
	h ^= (__u32)n * 4;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

SEC("tc")
int vipd_dsr(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct svc_key sk = {};
	struct vip_key vk = {};
	__u32 words[10] = {};
	int nwords;
	__u8 *l4;
	__u32 ports; /* source and destination port as they lie in memory */
	__u8 proto;

	if ((void *)(eth + 1) > data_end)
		return count(R_PASS_TRUNCATED, TC_ACT_OK);
	if (skb->vlan_present || eth->h_proto == bpf_htons(ETH_P_8021Q) || eth->h_proto == bpf_htons(ETH_P_8021AD))
		return count(R_PASS_VLAN, TC_ACT_OK);

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 hlen;

		if ((void *)(ip + 1) > data_end)
			return count(R_PASS_TRUNCATED, TC_ACT_OK);
		hlen = ip->ihl * 4;
		if (ip->version != 4 || hlen < sizeof(*ip) || (void *)ip + hlen > data_end)
			return count(R_PASS_TRUNCATED, TC_ACT_OK);
		if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset */
			return count(R_PASS_FRAGMENT, TC_ACT_OK);
		proto = ip->protocol;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return count(R_PASS_PROTO, TC_ACT_OK);
		l4 = (void *)ip + hlen;
		if ((void *)(l4 + 4) > data_end)
			return count(R_PASS_TRUNCATED, TC_ACT_OK);
		__builtin_memcpy(&ports, l4, 4);
		__builtin_memcpy(sk.addr, &ip->daddr, 4);
		sk.family = 4;
		words[0] = ip->saddr;
		words[1] = ip->daddr;
		words[2] = ports;
		words[3] = proto;
		nwords = 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return count(R_PASS_TRUNCATED, TC_ACT_OK);
		proto = ip6->nexthdr;
		if (proto == 44) /* IPPROTO_FRAGMENT */
			return count(R_PASS_FRAGMENT, TC_ACT_OK);
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return count(R_PASS_PROTO, TC_ACT_OK);
		l4 = (void *)(ip6 + 1);
		if ((void *)(l4 + 4) > data_end)
			return count(R_PASS_TRUNCATED, TC_ACT_OK);
		__builtin_memcpy(&ports, l4, 4);
		__builtin_memcpy(sk.addr, &ip6->daddr, 16);
		sk.family = 6;
		__builtin_memcpy(&words[0], &ip6->saddr, 16);
		__builtin_memcpy(&words[4], &ip6->daddr, 16);
		words[8] = ports;
		words[9] = proto;
		nwords = 10;
	} else {
		return count(R_PASS_NOT_IP, TC_ACT_OK);
	}

	sk.port = ports >> 16; /* the destination port's two bytes, still in network order */
	sk.proto = proto;
	struct svc_val *svc = bpf_map_lookup_elem(&services, &sk);
	if (!svc)
		return count(R_PASS_NO_SERVICE, TC_ACT_OK);

	__u64 src_mac = 0;
	__builtin_memcpy(&src_mac, eth->h_source, 6);
	if (bpf_map_lookup_elem(&peers, &src_mac))
		return count(R_PASS_PEER, TC_ACT_OK);

	__builtin_memcpy(vk.addr, sk.addr, 16);
	vk.family = sk.family;
	/* Not (or no longer) proven owner: a backend host takes the frame up its stack (a peer may have
	 * directed it here); any other host drops it, so a stale owner never answers a flow with RST. */
	__u64 *deadline = bpf_map_lookup_elem(&fence, &vk);
	if (!deadline || bpf_ktime_get_ns() >= *deadline) {
		if (!(svc->flags & SVC_SELF_BACKEND))
			return count(R_DROP_FENCED, TC_ACT_SHOT);
		return count(deadline ? R_PASS_EXPIRED : R_PASS_NOT_ARMED, TC_ACT_OK);
	}

	__u32 h = murmur3(words, nwords);
	__u32 slot = ((svc->id % MAX_SERVICES) * 2 + (svc->active & 1)) * TABLE_SIZE + h % TABLE_SIZE;
	__u32 *bid = bpf_map_lookup_elem(&tables, &slot);
	if (!bid || *bid == EMPTY)
		return count(R_DROP_NO_BACKEND, TC_ACT_SHOT);
	__u32 b = *bid;
	struct backend *be = bpf_map_lookup_elem(&backends, &b);
	if (!be || !be->valid)
		return count(R_DROP_NO_BACKEND, TC_ACT_SHOT);
	struct traffic *t = bpf_map_lookup_elem(&backend_traffic, &b);
	if (t) {
		t->packets += 1;
		t->bytes += skb->len;
	}
	if (be->local)
		return count(R_LOCAL, TC_ACT_OK);

	__u32 ifindex = skb->ifindex;
	struct iface *ifc = bpf_map_lookup_elem(&ifaces, &ifindex);
	if (!ifc)
		return count(R_DROP_NO_IFACE, TC_ACT_SHOT);
	/* eth may be stale for the verifier after helper calls on some kernels: re-derive it */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return count(R_PASS_TRUNCATED, TC_ACT_OK);
	__builtin_memcpy(eth->h_dest, be->mac, 6);
	__builtin_memcpy(eth->h_source, ifc->mac, 6);
	count(R_DIRECTED, 0);
	return bpf_redirect(ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
