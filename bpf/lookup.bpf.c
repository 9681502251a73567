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
 * Per packet, the common case: the per-CPU slot the miss program reads, then a per-CPU
 * array slot and a compare of the key for the destination, the same for a UDP
 * datagram's peer, and the coarse clock (the kernel inlines per-CPU array lookups). The
 * hash maps are reached only when a slot changes hands (another destination or peer
 * hashed to it), for a new peer, and for a busy peer once a second: lookup_cache and
 * peer_cache are per-CPU, direct-mapped write-back caches in front of lookup_counts and
 * udp_peers (a hash-map operation took 25-35 ns a packet here; the caches took a UDP
 * flood from -13.7% to -10.5%, bench/bench_lookup.py). User space adds both when it
 * reads (sockwatch/kernel/lookup.py). No atomics, no ring-buffer record.
 */

#ifndef SW_MAX_LOOKUP_KEYS
#define SW_MAX_LOOKUP_KEYS 16384
#endif
#ifndef SW_MAX_UDP_PEERS
#define SW_MAX_UDP_PEERS 16384
#endif
#define SW_NETNS_MAGIC 0x5357c00c1e5eed01ULL /* replaced by the namespace's cookie at load */
#define SW_CACHE_BITS 8                        /* 256 slots a CPU, each cache */
#define SW_PEER_FLUSH_NS 1000000000ULL         /* a cached peer reaches udp_peers once a second */

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
BPF_PERCPU_ARRAY(lookup_cache, struct sw_lookup_cached, 1 << SW_CACHE_BITS);
/* Per-CPU LRU lists: a new peer never takes a lock another CPU holds. */
BPF_F_TABLE("lru_percpu_hash", struct sw_peer_key, struct sw_peer_count, udp_peers, SW_MAX_UDP_PEERS,
	    BPF_F_NO_COMMON_LRU);
#ifndef SW_NO_PEERS
BPF_PERCPU_ARRAY(peer_cache, struct sw_peer_cached, 1 << SW_CACHE_BITS);
#endif
BPF_PERCPU_ARRAY(lookup_slot, struct sw_lookup_slot, 1);
/* Written by user space: where a drop for no socket means a TCP/UDP lookup found none. */
BPF_ARRAY(drop_sites, struct sw_range, SW_DROP_SITES);
BPF_ARRAY(abi_lookup_key, struct sw_lookup_key, 1);
BPF_ARRAY(abi_peer_key, struct sw_peer_key, 1);
BPF_ARRAY(abi_lookup_cached, struct sw_lookup_cached, 1);
BPF_ARRAY(abi_peer_cached, struct sw_peer_cached, 1);

/* A ctx field read as its own load: clang otherwise merges the v4 and v6 branches' loads
 * into one through a pointer chosen by family, a ctx access the verifier refuses. */
#define CTX(field) (*(volatile typeof(field) *)&(field))

static __always_inline u32 cache_index(u32 h)
{
	return (h * 0x9E3779B1U) >> (32 - SW_CACHE_BITS); /* Fibonacci hashing: the high bits mix best */
}

/* A slot changes hands: what it held goes to lookup_counts (lost only when that is full). */
static __always_inline void flush_lookup(struct sw_lookup_cached *e)
{
	struct sw_lookup_count *c = lookup_counts.lookup(&e->key);
	if (c) {
		c->lookups += e->lookups;
		c->misses += e->misses;
		return;
	}
	/* Per CPU: should another CPU have added the key meanwhile, this writes only this
	 * CPU's count, which was 0. It fails only when the map is full. */
	struct sw_lookup_count v = {e->lookups, e->misses};
	if (lookup_counts.update(&e->key, &v)) {
		u32 idx = SW_C_LOOKUP_FULL;
		u64 *n = counters.lookup(&idx);
		if (n)
			*n += e->lookups;
	}
}

#ifndef SW_NO_PEERS /* serve --max-udp-peers 0 */
static __always_inline void flush_peer(struct sw_peer_cached *q)
{
	struct sw_peer_count *c = udp_peers.lookup(&q->key);
	if (c) {
		c->packets += q->packets;
		c->last_ns = q->last_ns;
		return;
	}
	/* evicted meanwhile (or never there): what the slot holds starts it again */
	struct sw_peer_count v = {q->packets, q->last_ns};
	if (udp_peers.update(&q->key, &v) == 0)
		count(SW_C_PEERS_NEW);
}

static __always_inline void count_peer(struct bpf_sk_lookup *ctx, struct sw_lookup_key *k, u32 h)
{
	struct sw_peer_key p = {};
	p.netns_cookie = k->netns_cookie;
	p.local_addr[0] = k->addr[0];
	p.local_addr[1] = k->addr[1];
	p.local_addr[2] = k->addr[2];
	p.local_addr[3] = k->addr[3];
	if (k->family == AF_INET6) {
		p.remote_addr[0] = CTX(ctx->remote_ip6[0]);
		p.remote_addr[1] = CTX(ctx->remote_ip6[1]);
		p.remote_addr[2] = CTX(ctx->remote_ip6[2]);
		p.remote_addr[3] = CTX(ctx->remote_ip6[3]);
	} else {
		p.remote_addr[0] = CTX(ctx->remote_ip4);
	}
	p.local_port = k->port;
	p.remote_port = bpf_ntohs(ctx->remote_port);
	p.family = k->family;
	u32 i = cache_index(h ^ p.remote_addr[0] ^ p.remote_addr[3] ^ ((u32)p.remote_port << 7));
	struct sw_peer_cached *q = peer_cache.lookup(&i);
	if (!q)
		return;
	u64 now = bpf_ktime_get_coarse_ns();
	u64 *a = (u64 *)&q->key, *b = (u64 *)&p;
	if (a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]) {
		q->packets++;
		q->last_ns = now;
		if (now - q->flushed_ns < SW_PEER_FLUSH_NS)
			return;
		/* a busy peer still reaches udp_peers, so the LRU knows it is recent */
		flush_peer(q);
		q->packets = 0;
		q->flushed_ns = now;
		return;
	}
	if (q->packets)
		flush_peer(q);
	q->key = p;
	q->packets = 1;
	q->last_ns = now;
	q->flushed_ns = now;
	flush_peer(q); /* a new peer is in udp_peers at once: its first datagram counts as seen */
	q->packets = 0;
}
#endif

int sw_lookup(struct bpf_sk_lookup *ctx)
{
	u32 zero = 0;
	struct sw_lookup_slot *s = lookup_slot.lookup(&zero);
	if (!s)
		return SK_PASS;
	struct sw_lookup_key k = {};
	/* opaque to the compiler, so the cookie stays one ld_imm64 for user space to patch
	 * (the hash below would otherwise fold it into other constants) */
	u64 netns = SW_NETNS_MAGIC;
	asm volatile("" : "+r"(netns));
	k.netns_cookie = netns;
	if (ctx->family == AF_INET6) {
		k.addr[0] = CTX(ctx->local_ip6[0]);
		k.addr[1] = CTX(ctx->local_ip6[1]);
		k.addr[2] = CTX(ctx->local_ip6[2]);
		k.addr[3] = CTX(ctx->local_ip6[3]);
	} else {
		k.addr[0] = CTX(ctx->local_ip4);
	}
	k.port = ctx->local_port; /* host order in bpf_sk_lookup */
	k.family = ctx->family;
	k.protocol = ctx->protocol;
	u32 h = k.addr[0] ^ k.addr[3] ^ ((u32)k.port << 16 | (u32)k.protocol << 8 | k.family) ^ (u32)netns ^
		(u32)(netns >> 32);
	u32 i = cache_index(h);
	struct sw_lookup_cached *e = lookup_cache.lookup(&i);
	if (!e)
		return SK_PASS;
	u64 *a = (u64 *)&e->key, *b = (u64 *)&k;
	if (a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]) {
		e->lookups++;
	} else {
		if (e->lookups)
			flush_lookup(e);
		e->key = k;
		e->lookups = 1;
		e->misses = 0;
	}
	s->index = i;
	s->armed = 1;
#ifndef SW_NO_PEERS
	if (k.protocol == IPPROTO_UDP)
		count_peer(ctx, &k, h);
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
	u32 i = s->index;
	struct sw_lookup_cached *e = lookup_cache.lookup(&i);
	if (e)
		e->misses++; /* the slot still holds the lookup's key: nothing ran on this CPU since */
	return 0;
}
