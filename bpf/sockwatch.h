/* sockwatch.h — every struct that crosses the kernel/user boundary.
 *
 * sockwatch/kernel/abi.py mirrors these and checks, at load, that each mirror has the
 * size the compiler gave the C struct. Byte order is stated on every field: the UAPI
 * context structs mix both orders.
 *
 * TCP connections cost user space nothing until a view asks: their rows are read then
 * from the kernel's own table (sock_diag) and joined with the owners connect() left in
 * owner_log (udp.bpf.c), and their records reach the ring only while someone streams
 * events. UDP sockets and listeners are read then too (a close has no hook that is
 * cheap on every socket's path: udp.bpf.c); listens, binds and UDP connects always
 * reach the ring, closes while someone streams.
 */
#ifndef SOCKWATCH_H
#define SOCKWATCH_H

#define SW_COMM_LEN 16

/* sw_event.flags */
#define SW_F_OWNER   0x01 /* pid/uid/comm: the hook ran in the owner's syscall */
#define SW_F_PRESTART 0x02 /* RELEASE of a TCP listener (one from before start has no state callbacks) */
#define SW_F_LIFETIME 0x04 /* STATE to CLOSE: `life` holds the connection's totals, pid its
			    * retransmits and uid its smoothed RTT in microseconds */
#define SW_F_PORT_ASKED 0x08 /* BIND, BIND_FAIL: bind() named a port (else the kernel chose) */

/* sw_event.bind_opts (and sw_bind.opts) */
#define SW_B_KNOWN     0x01 /* the options below were read (bpf_getsockopt) */
#define SW_B_REUSEADDR 0x02
#define SW_B_REUSEPORT 0x04
#define SW_B_DEVICE    0x08 /* bound to a device: its ifindex in remote_addr[0] (host order) */

/* sw_event.kind */
#define SW_EV_BIND        1 /* post_bind (UDP): local address and port set */
#define SW_EV_LISTEN      2 /* sockops TCP_LISTEN_CB (also covers listen without bind) */
#define SW_EV_CONNECT     3 /* sockops TCP_CONNECT_CB: SYN about to go out, port chosen */
#define SW_EV_ESTABLISHED 4 /* reserved: an active open is confirmed by a kernel read (tcp.bpf.c) */
#define SW_EV_ACCEPT      5 /* sockops PASSIVE_ESTABLISHED_CB: new child socket */
#define SW_EV_STATE       6 /* sockops STATE_CB: old_state -> state */
#define SW_EV_UDP_CONNECT 7 /* connect() on a UDP socket: remote set, local chosen by the kernel */
#define SW_EV_RELEASE     8 /* close of the last file reference */
#define SW_EV_BIND_FAIL   9 /* bind() failed: err = errno, local = the address asked for */

/* Index of the per-CPU counters array: every loss is counted where it happens. */
#define SW_C_RINGBUF_FULL   0 /* an event could not be reserved: user space resyncs */
#define SW_C_EVENTS         1 /* events submitted */
#define SW_C_LOOKUP_FULL    2 /* lookups whose key did not fit in lookup_counts: not counted */
#define SW_C_MISS_UNMATCHED 3 /* a TCP/UDP drop for no socket that no lookup of ours preceded
			       * (a namespace not hooked yet): not attributed to a port */
#define SW_C_PEERS_NEW      4 /* peers added to udp_peers (less those present = evicted) */
#define SW_C_TCP_CHANGES    5 /* TCP connections opened, or changing state: the table's generation */
#define SW_C_TCP_OPENED     6 /* TCP connections opened (connect, accept) */
#define SW_C_DROPS_UNCOUNTED 7 /* a socket's drop that found socket_drops full: not counted by reason */
#define SW_C_MAX            8

/* Index of the config array, written by user space (0 is unused). */
#define SW_CFG_CONNECT_OWNER   1 /* 1: sockops cannot read the task (before 6.2): cgroup connect4/6
				  * leave a TCP connect()'s owner for it (tcp.bpf.c) */
#define SW_CFG_STREAM          2 /* 1 while someone streams events: connection records reach the ring */
#define SW_CFG_MAX             3



struct sw_event {
	__u64 cookie;         /* socket cookie (SO_COOKIE), host order */
	__u64 netns_cookie;   /* network namespace cookie (SO_NETNS_COOKIE), host order */
	__u64 ts_ns;          /* CLOCK_MONOTONIC_COARSE at the hook (jiffies), host order */
	__u32 local_addr[4];  /* network order; IPv4 in [0], rest zero */
	__u32 remote_addr[4]; /* network order; IPv4 in [0], rest zero */
	__u32 pid;            /* tgid, valid with SW_F_OWNER, host order */
	__u32 uid;            /* valid with SW_F_OWNER, host order */
	__u16 local_port;     /* host order, 0 = not known */
	__u16 remote_port;    /* host order, 0 = not connected */
	__u8  family;         /* AF_INET or AF_INET6 */
	__u8  protocol;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  kind;           /* SW_EV_* */
	__u8  state;          /* kernel TCP_* numbering after the change; UDP: 7 unconnected, 1 connected */
	__u8  old_state;      /* SW_EV_STATE and SW_EV_RELEASE: state before */
	__u8  flags;          /* SW_F_* */
	__u16 bind_opts;      /* SW_EV_BIND_FAIL: SW_B_*, the socket's options as bind() saw them; else 0 */
	__s32 err;            /* SW_EV_BIND_FAIL: the errno bind() returned; else 0 */
	union {
		char comm[SW_COMM_LEN]; /* owner's thread name, NUL padded, valid with SW_F_OWNER */
		struct {
			__u64 bytes_acked;    /* host order, with SW_F_LIFETIME */
			__u64 bytes_received; /* host order */
		} life;
	};
};

/* The owner of a TCP socket that connect()ed, as the hook saw it: one slot of a CPU's
 * owner_log. `cookie` is written first and `cookie_end` last: a slot user space reads
 * while it is being overwritten has them differ, and is skipped. */
struct sw_owner_slot {
	__u64 cookie;         /* host order; 0: never written */
	__u32 pid;            /* tgid, host order (the uid is the socket's: sock_diag has it) */
	__u32 pad;
	__u64 cookie_end;     /* host order, = cookie once the slot is whole */
};

#define SW_OWNER_SLOTS 8192 /* per CPU; a power of two */

/* One CPU's connect()s, newest at head - 1: a ring that overwrites its oldest slot (no
 * allocation, no lock, no delete: a connect costs a few stores). User space reads it
 * when a view asks, and keeps what it found with its rows; an owner overwritten before
 * anyone asked is read from /proc instead. */
struct sw_owner_log {
	__u64 head;           /* slots written so far, host order */
	struct sw_owner_slot slots[SW_OWNER_SLOTS];
};

/* A bind() in progress, from the cgroup bind hook to the syscall's exit (keyed by the
 * task's pid_tgid): what the socket asked for, in case bind() fails. */
struct sw_bind {
	__u64 cookie;         /* host order */
	__u64 netns_cookie;   /* host order */
	__u32 addr[4];        /* network order; IPv4 in [0] */
	__u16 port;           /* host order, as asked (0: the kernel chooses) */
	__u8  family;
	__u8  protocol;
	__u8  posted;         /* post_bind ran: it reported the bind */
	__u8  opts;           /* SW_B_* */
	__u8  pad[2];
	__u32 bound_dev;      /* SO_BINDTODEVICE's ifindex, host order; 0: none */
	__u32 pad2;
};

/* A destination the kernel looked up a socket for (sk_lookup): what lookup_counts is
 * keyed by. The padding is zero: the key is hashed whole. */
struct sw_lookup_key {
	__u64 netns_cookie;   /* host order: the namespace the program was loaded for */
	__u32 addr[4];        /* local (destination) address, network order; IPv4 in [0] */
	__u16 port;           /* local (destination) port, host order */
	__u8  family;         /* AF_INET or AF_INET6 (a v4 packet to a dual-stack socket is AF_INET) */
	__u8  protocol;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 pad;
};

/* Per CPU, per key. */
struct sw_lookup_count {
	__u64 lookups;        /* times the kernel looked up a socket for this destination */
	__u64 misses;         /* of those, found none: answered with RST or ICMP port unreachable */
};

/* A remote peer of an unconnected UDP socket's destination: udp_peers' key. */
struct sw_peer_key {
	__u64 netns_cookie;   /* host order */
	__u32 local_addr[4];  /* network order; IPv4 in [0] */
	__u32 remote_addr[4]; /* network order; IPv4 in [0] */
	__u16 local_port;     /* host order */
	__u16 remote_port;    /* host order */
	__u8  family;
	__u8  pad[7];
};

/* Per CPU, per peer. */
struct sw_peer_count {
	__u64 packets;
	__u64 last_ns;        /* CLOCK_MONOTONIC_COARSE of the last datagram, host order */
};

/* A destination's counts not yet added to lookup_counts: one slot of the per-CPU,
 * direct-mapped lookup_cache in front of it. An empty slot has lookups 0. */
struct sw_lookup_cached {
	struct sw_lookup_key key;
	__u64 lookups;
	__u64 misses;
};

/* A peer's datagrams not yet added to udp_peers: one slot of peer_cache. */
struct sw_peer_cached {
	struct sw_peer_key key;
	__u64 packets;        /* 0: an empty slot */
	__u64 last_ns;        /* CLOCK_MONOTONIC_COARSE of the last datagram */
	__u64 flushed_ns;     /* when udp_peers last saw this peer (its LRU recency) */
};

/* The last lookup on this CPU, until the packet is delivered or dropped for no socket
 * (both happen on the CPU that looked it up, before its next lookup). */
struct sw_lookup_slot {
	__u32 index;          /* its lookup_cache slot, which holds its key until the next lookup */
	__u32 armed;          /* 1 from the lookup until a drop for no socket takes it */
};

/* A socket and a kernel drop reason: socket_drops' key (drops.bpf.c). */
struct sw_drop_key {
	__u64 cookie;         /* socket cookie, host order */
	__u32 reason;         /* enum skb_drop_reason, this kernel's numbering */
	__u32 pad;
};

#endif
