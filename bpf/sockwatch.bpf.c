/* sockwatch.bpf.c — the maps every hook shares and the helpers they use.
 *
 * One compilation unit so that all programs see the same maps; each concern lives in
 * its own file below. Only UAPI context structs (bpf_sock, bpf_sock_ops,
 * bpf_sock_addr) and helpers are read: the headers bcc compiles against may come
 * from another kernel version, so no kernel-internal struct is ever dereferenced.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "sockwatch.h"

#ifndef SW_MAX_SOCKS
#define SW_MAX_SOCKS 262144
#endif
#ifndef SW_RINGBUF_PAGES
#define SW_RINGBUF_PAGES 4096 /* 16 MiB: ~170k events of burst before a loss */
#endif

/* Kernel TCP state numbers (include/net/tcp_states.h; not in UAPI). */
#define SW_TCP_ESTABLISHED 1
#define SW_TCP_SYN_SENT    2
#define SW_TCP_CLOSE       7
#define SW_TCP_LISTEN      10

/* The live table: one row per TCP/UDP socket, keyed by socket cookie. */
BPF_HASH(socks, u64, struct sw_sock, SW_MAX_SOCKS);
/* Every change to a row, in order, for the tracker and the event stream. */
BPF_RINGBUF_OUTPUT(events, SW_RINGBUF_PAGES);
/* Losses and totals, per CPU so that counting needs no atomics. */
BPF_PERCPU_ARRAY(counters, u64, SW_C_MAX);
/* UDP connect in flight, keyed by pid_tgid; LRU so connects that never reach the
 * syscall exit tracepoint (io_uring) cannot fill it. */
BPF_TABLE("lru_hash", u64, struct sw_pending, pending_connect, 16384);
/* Never written: gives user space the compiled size of struct sw_event. */
BPF_ARRAY(abi_event, struct sw_event, 1);

static __always_inline void count(u32 idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline void emit(struct sw_sock *s, u8 kind, u8 old_state)
{
	struct sw_event *e = events.ringbuf_reserve(sizeof(struct sw_event));
	if (!e) {
		count(SW_C_RINGBUF_FULL);
		return;
	}
	__builtin_memcpy(&e->sock, s, sizeof(struct sw_sock));
	e->kind = kind;
	e->old_state = old_state;
	e->pad = 0;
	e->err = 0;
	events.ringbuf_submit(e, 0);
	count(SW_C_EVENTS);
}

/* Only valid in hooks that run in the context of the task that holds the socket. */
static __always_inline void take_owner(struct sw_sock *s)
{
	s->pid = bpf_get_current_pid_tgid() >> 32;
	s->uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(s->comm, sizeof(s->comm));
	s->flags |= SW_F_OWNER;
}

/* Insert a fresh row and return the map's copy; counts a full map. */
static __always_inline struct sw_sock *row_insert(struct sw_sock *s)
{
	if (socks.update(&s->cookie, s)) {
		count(SW_C_MAP_FULL);
		return 0;
	}
	return socks.lookup(&s->cookie);
}

/* v6 is a constant at every call: post_bind4 may read only src_ip4 and post_bind6 only
 * src_ip6 (a v6 socket binding a v4-mapped address still runs post_bind6). */
static __always_inline void local_from_sock(struct sw_sock *s, struct bpf_sock *sk, int v6)
{
	if (v6) {
		s->local_addr[0] = sk->src_ip6[0];
		s->local_addr[1] = sk->src_ip6[1];
		s->local_addr[2] = sk->src_ip6[2];
		s->local_addr[3] = sk->src_ip6[3];
	} else {
		s->local_addr[0] = sk->src_ip4;
	}
	s->local_port = sk->src_port; /* host order in bpf_sock */
}

#include "lifecycle.bpf.c"
#include "tcp.bpf.c"
#include "udp.bpf.c"
