/* sockwatch.bpf.c — the maps every hook shares and the helpers they use.
 *
 * One compilation unit so that all programs see the same maps; each concern lives in
 * its own file below. Only UAPI context structs (bpf_sock, bpf_sock_ops,
 * bpf_sock_addr, bpf_sk_lookup), tracepoint fields and helpers are read: the headers
 * bcc compiles against may come from another kernel version, so no kernel-internal
 * struct is ever dereferenced.
 *
 * Every hook here runs on someone's production traffic. What keeps them cheap: a TCP
 * connection costs one per-CPU increment per callback and, if connect() opened it, a
 * few stores into this CPU's owner_log (no map update: a hash or socket-local storage
 * update costs 0.5-1 us here); its records reach the ring only while someone streams
 * (SW_CFG_STREAM). No program runs at every socket's creation, and while nobody streams
 * none at its close or at a connect() but sockops: a cgroup hook's dispatch alone costs
 * ~50 ns a run here, so sock_release and connect4/6 are attached only while someone
 * streams (user space reads UDP sockets, listeners and connections from the kernel when
 * a view asks; sockops logs connect()s' owners), and sock_create not at all. A record wakes no one (user space drains on a short timer; every
 * SW_WAKE_EVERY-th record per CPU wakes it so that a burst cannot fill the ring between
 * two timer ticks).
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "sockwatch.h"

#ifndef SW_RINGBUF_PAGES
#define SW_RINGBUF_PAGES 4096 /* 16 MiB: ~160k events of burst before a loss */
#endif
#ifndef SW_WAKE_EVERY
#define SW_WAKE_EVERY 8192 /* records per CPU between forced wakeups; a power of two */
#endif

/* Kernel TCP state numbers (include/net/tcp_states.h; not in UAPI). */
#define SW_TCP_ESTABLISHED 1
#define SW_TCP_SYN_SENT    2
#define SW_TCP_CLOSE       7
#define SW_TCP_LISTEN      10

/* Every change, in order, for the tracker and the event stream. */
BPF_RINGBUF_OUTPUT(events, SW_RINGBUF_PAGES);
/* Losses and totals, per CPU so that counting needs no atomics. */
BPF_PERCPU_ARRAY(counters, u64, SW_C_MAX);
/* Written by user space only. */
BPF_ARRAY(config, u64, SW_CFG_MAX);
/* bind() calls between the cgroup bind hook and the syscall's exit (see bind.bpf.c). */
BPF_TABLE("lru_hash", u64, struct sw_bind, binding, 1024);
/* The owner of the TCP connect() in progress on this CPU, for sockops on kernels where it
 * cannot read the task (SW_CFG_CONNECT_OWNER, tcp.bpf.c). Internal: user space never reads it. */
struct sw_connect_owner {
	u64 cookie;
	u32 pid;
	u32 uid;
	char comm[SW_COMM_LEN];
};
BPF_PERCPU_ARRAY(connect_owner, struct sw_connect_owner, 1);
#ifndef SW_NCPUS
#define SW_NCPUS 64 /* possible CPUs (the loader says) */
#endif
/* Who connect()ed each TCP socket lately, one ring per CPU (udp.bpf.c). */
BPF_ARRAY(owner_log, struct sw_owner_log, SW_NCPUS);
/* Never written: give user space the compiled sizes of the shared structs. */
BPF_ARRAY(abi_event, struct sw_event, 1);
BPF_ARRAY(abi_bind, struct sw_bind, 1);
BPF_ARRAY(abi_owner_slot, struct sw_owner_slot, 1);

static __always_inline u64 count(u32 idx)
{
	u64 *v = counters.lookup(&idx);
	if (!v)
		return 0;
	return ++*v;
}

static __always_inline u64 config_get(u32 idx)
{
	u64 *v = config.lookup(&idx);
	return v ? *v : 0;
}

/* A record for `cookie` with every field but the addresses, owner and comm set, or
 * NULL (counted) when the ring is full. Fields a hook does not set stay as an older
 * record left them: flags say which are valid, and the ring holds only our own records.
 * The clock is the coarse one (jiffies): the precise clock read costs as much as the
 * rest of the record on some hosts. */
static __always_inline struct sw_event *event_new_at(u64 ts, u64 cookie, u8 kind, u64 netns_cookie, u8 family,
						     u8 protocol, u8 state, u8 old_state)
{
	struct sw_event *e = events.ringbuf_reserve(sizeof(struct sw_event));
	if (!e) {
		count(SW_C_RINGBUF_FULL);
		return 0;
	}
	e->cookie = cookie;
	e->netns_cookie = netns_cookie;
	e->ts_ns = ts;
	e->family = family;
	e->protocol = protocol;
	e->kind = kind;
	e->state = state;
	e->old_state = old_state;
	e->flags = 0;
	e->bind_opts = 0;
	e->local_port = 0;
	e->remote_port = 0;
	e->err = 0;
	return e;
}

#define event_new(...) event_new_at(bpf_ktime_get_coarse_ns(), __VA_ARGS__)

static __always_inline void zero_addrs(struct sw_event *e)
{
	__builtin_memset(e->local_addr, 0, sizeof(e->local_addr));
	__builtin_memset(e->remote_addr, 0, sizeof(e->remote_addr));
}

static __always_inline void event_send(struct sw_event *e)
{
	u64 n = count(SW_C_EVENTS);
	events.ringbuf_submit(e, (n & (SW_WAKE_EVERY - 1)) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}

/* Only valid in hooks that run in the syscall of the task that holds the socket. */
static __always_inline void take_owner(struct sw_event *e)
{
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->flags |= SW_F_OWNER;
}

/* v6 is a constant at every call: post_bind4 may read only src_ip4 and post_bind6 only
 * src_ip6 (a v6 socket binding a v4-mapped address still runs post_bind6). */
static __always_inline void local_from_sock(struct sw_event *e, struct bpf_sock *sk, int v6)
{
	if (v6) {
		e->local_addr[0] = sk->src_ip6[0];
		e->local_addr[1] = sk->src_ip6[1];
		e->local_addr[2] = sk->src_ip6[2];
		e->local_addr[3] = sk->src_ip6[3];
	} else {
		e->local_addr[0] = sk->src_ip4;
		e->local_addr[1] = 0;
		e->local_addr[2] = 0;
		e->local_addr[3] = 0;
	}
	e->local_port = sk->src_port; /* host order in bpf_sock */
}

#include "udp.bpf.c"
#include "tcp.bpf.c"
#include "lifecycle.bpf.c"
#include "bind.bpf.c"
#include "lookup.bpf.c"
#include "drops.bpf.c"
