/* lookup.bpf.c — which destinations the kernel looks up a socket for, which of those
 * find none, and who sends to unconnected UDP sockets. Included by sockwatch.bpf.c.
 *
 * sw_lookup is a BPF_PROG_TYPE_SK_LOOKUP program, attached to every network namespace
 * by a BPF link. The kernel runs it in inet_lookup_run_sk_lookup()
 * (net/ipv4/inet_hashtables.c, net/ipv6/inet6_hashtables.c, udp.c), before it looks for
 * a listener or a bound UDP socket: for TCP only when no established socket matched
 * (a SYN, a stray segment), for UDP only when no connected socket did. It only
 * observes: it returns SK_PASS and never calls bpf_sk_assign(), so the kernel picks the
 * same socket it would without it.
 *
 * An SK_LOOKUP program may not call bpf_get_netns_cookie(), so user space loads one
 * copy per namespace with that namespace's cookie in place of SW_NETNS_MAGIC
 * (sockwatch/kernel/lookup.py).
 *
 * Running before the lookup, the program cannot see that it found nothing. The kernel
 * then drops the packet with reason NO_SOCKET in tcp_v4_rcv / tcp_v6_rcv / __udp4_lib_rcv
 * / __udp6_lib_rcv, on the same CPU and before that CPU looks up anything else:
 * sw_lookup_miss, a raw tracepoint program on kfree_skb (a perf-event tracepoint
 * copies every drop's record first: 8% of a UDP flood into a full queue here, against
 * 3%), charges such a drop to the lookup this CPU made last. Drop sites are checked
 * against those functions' addresses (drop_sites), so an ICMP echo reply no ping socket
 * wanted (also NO_SOCKET) is not taken for a closed port.
 *
 * Per packet: one per-CPU array lookup, one per-CPU hash lookup, and for UDP one
 * per-CPU LRU lookup. No atomics, no ring-buffer record.
 */

#ifndef SW_MAX_LOOKUP_KEYS
#define SW_MAX_LOOKUP_KEYS 16384
#endif
#ifndef SW_MAX_UDP_PEERS
#define SW_MAX_UDP_PEERS 16384
#endif
#define SW_NETNS_MAGIC 0x5357c00c1e5eed01ULL /* replaced by the namespace's cookie at load */

/* The drop reasons' numbers differ between kernels: user space reads NO_SOCKET's from
 * skb:kfree_skb's format file. */
#ifndef SW_DROP_NO_SOCKET
#define SW_DROP_NO_SOCKET 3
#endif
#define SW_DROP_SITES 8

struct sw_range {
	u64 start, end; /* [start, end) of a kernel function's text; end 0: unused */
};

BPF_PERCPU_HASH(lookup_counts, struct sw_lookup_key, struct sw_lookup_count, SW_MAX_LOOKUP_KEYS);
/* Per-CPU LRU lists: a new peer never takes a lock another CPU holds. */
BPF_F_TABLE("lru_percpu_hash", struct sw_peer_key, struct sw_peer_count, udp_peers, SW_MAX_UDP_PEERS,
	    BPF_F_NO_COMMON_LRU);
BPF_PERCPU_ARRAY(lookup_slot, struct sw_lookup_slot, 1);
/* Written by user space: where a drop for no socket means a TCP/UDP lookup found none. */
BPF_ARRAY(drop_sites, struct sw_range, SW_DROP_SITES);
BPF_ARRAY(abi_lookup_key, struct sw_lookup_key, 1);
BPF_ARRAY(abi_peer_key, struct sw_peer_key, 1);

static __always_inline void count_peer(struct bpf_sk_lookup *ctx, struct sw_lookup_key *k)
{
	struct sw_peer_key p = {};
	p.netns_cookie = k->netns_cookie;
	p.local_addr[0] = k->addr[0];
	p.local_addr[1] = k->addr[1];
	p.local_addr[2] = k->addr[2];
	p.local_addr[3] = k->addr[3];
	if (k->family == AF_INET6) {
		p.remote_addr[0] = ctx->remote_ip6[0];
		p.remote_addr[1] = ctx->remote_ip6[1];
		p.remote_addr[2] = ctx->remote_ip6[2];
		p.remote_addr[3] = ctx->remote_ip6[3];
	} else {
		p.remote_addr[0] = ctx->remote_ip4;
	}
	p.local_port = k->port;
	p.remote_port = bpf_ntohs(ctx->remote_port);
	p.family = k->family;
	u64 now = bpf_ktime_get_coarse_ns();
	struct sw_peer_count *c = udp_peers.lookup(&p);
	if (c) {
		c->packets++;
		c->last_ns = now;
		return;
	}
	struct sw_peer_count one = {1, now};
	if (udp_peers.update(&p, &one) == 0)
		count(SW_C_PEERS_NEW);
}

int sw_lookup(struct bpf_sk_lookup *ctx)
{
	u32 zero = 0;
	struct sw_lookup_slot *s = lookup_slot.lookup(&zero);
	if (!s)
		return SK_PASS;
	struct sw_lookup_key *k = &s->key;
	k->netns_cookie = SW_NETNS_MAGIC;
	if (ctx->family == AF_INET6) {
		k->addr[0] = ctx->local_ip6[0];
		k->addr[1] = ctx->local_ip6[1];
		k->addr[2] = ctx->local_ip6[2];
		k->addr[3] = ctx->local_ip6[3];
	} else {
		k->addr[0] = ctx->local_ip4;
		k->addr[1] = 0;
		k->addr[2] = 0;
		k->addr[3] = 0;
	}
	k->port = ctx->local_port; /* host order in bpf_sk_lookup */
	k->family = ctx->family;
	k->protocol = ctx->protocol;
	s->armed = 1;
	struct sw_lookup_count *c = lookup_counts.lookup(k);
	if (c) {
		c->lookups++;
	} else {
		/* Per CPU: should another CPU have added the key meanwhile, this writes only this
		 * CPU's count, which was 0. It fails only when the map is full. */
		struct sw_lookup_count one = {1, 0};
		if (lookup_counts.update(k, &one))
			count(SW_C_LOOKUP_FULL);
	}
#ifndef SW_NO_PEERS /* serve --max-udp-peers 0 */
	if (ctx->protocol == IPPROTO_UDP)
		count_peer(ctx, k);
#endif
	return SK_PASS;
}

static __always_inline int at_drop_site(u64 location)
{
#pragma unroll
	for (u32 i = 0; i < SW_DROP_SITES; i++) {
		u32 idx = i;
		struct sw_range *r = drop_sites.lookup(&idx);
		if (!r || !r->end)
			return 0;
		if (location >= r->start && location < r->end)
			return 1;
	}
	return 0;
}

int sw_lookup_miss(struct bpf_raw_tracepoint_args *ctx)
{
	/* kfree_skb(skb, location, reason[, rx_sk]): only the scalars are read */
	if ((u32)ctx->args[2] != SW_DROP_NO_SOCKET)
		return 0;
	if (!at_drop_site(ctx->args[1]))
		return 0;
	u32 zero = 0;
	struct sw_lookup_slot *s = lookup_slot.lookup(&zero);
	if (!s)
		return 0;
	if (!s->armed) {
		count(SW_C_MISS_UNMATCHED);
		return 0;
	}
	s->armed = 0;
	struct sw_lookup_count *c = lookup_counts.lookup(&s->key);
	if (c)
		c->misses++;
	return 0;
}
