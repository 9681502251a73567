/* drops.bpf.c — packets that reached a socket and were dropped there, per socket and
 * kernel drop reason. Included by sockwatch.bpf.c.
 *
 * sw_drop runs at skb:kfree_skb, which the kernel fires only for a packet it drops (one
 * delivered is freed by consume_skb): a delivered packet pays nothing. Since 6.11 the
 * tracepoint names the socket the packet was being delivered to (rx_sk). Only a BTF-typed
 * raw tracepoint program (tp_btf) may hand that pointer to bpf_get_socket_cookie (a plain
 * raw tracepoint sees a number, and reading struct sock is not done here: sockwatch.bpf.c).
 * bcc cannot load tp_btf programs: sockwatch/kernel/drops.py loads these instructions with
 * BPF_PROG_LOAD against the tracepoint's BTF id and attaches them by link. A kernel
 * without rx_sk refuses the program (its ctx has three arguments): sockwatch then shows
 * each socket's drop total from sock_diag (sk_drops), without reasons.
 *
 * Per drop: a shift and a compare for the reasons asked for, the cookie, and a per-CPU
 * hash update. SW_DROP_MASK_LO/HI are the reasons counted (bit n: reason n), built by user
 * space from this kernel's numbering (skb:kfree_skb's format file).
 */

#ifndef SW_MAX_DROP_KEYS
#define SW_MAX_DROP_KEYS 16384
#endif
#ifndef SW_DROP_MASK_LO
#define SW_DROP_MASK_LO 0ULL
#endif
#ifndef SW_DROP_MASK_HI
#define SW_DROP_MASK_HI 0ULL
#endif

/* Per CPU: a drop never waits for another CPU. User space deletes a socket's keys once
 * the socket is gone; a key that finds the map full is counted in SW_C_DROPS_UNCOUNTED. */
BPF_PERCPU_HASH(socket_drops, struct sw_drop_key, u64, SW_MAX_DROP_KEYS);
BPF_ARRAY(abi_drop_key, struct sw_drop_key, 1);

int sw_drop(u64 *ctx)
{
	/* kfree_skb(skb, location, reason, rx_sk) */
	u32 reason = (u32)ctx[2];
	if (reason >= 128)
		return 0;
	u64 mask = reason < 64 ? (u64)SW_DROP_MASK_LO >> reason : (u64)SW_DROP_MASK_HI >> (reason - 64);
	if (!(mask & 1))
		return 0;
	struct sw_drop_key k = {};
	k.cookie = bpf_get_socket_cookie((void *)ctx[3]); /* 0: no socket */
	if (!k.cookie)
		return 0;
	k.reason = reason;
	u64 *n = socket_drops.lookup(&k);
	if (n) {
		++*n;
		return 0;
	}
	u64 one = 1;
	if (socket_drops.update(&k, &one))
		count(SW_C_DROPS_UNCOUNTED);
	return 0;
}
