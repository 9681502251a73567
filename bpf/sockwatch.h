/* sockwatch.h — every struct that crosses the kernel/user boundary.
 *
 * sockwatch/kernel/abi.py mirrors these with ctypes and checks, at load, that each
 * mirror has the size the compiler gave the C struct (see sw_abi_sizes below).
 * Byte order is stated on every field: the UAPI context structs mix both orders.
 */
#ifndef SOCKWATCH_H
#define SOCKWATCH_H

#define SW_COMM_LEN 16

/* sw_sock.flags */
#define SW_F_OWNER     0x01 /* pid/uid/comm came from a hook running in the owner's context */
#define SW_F_ANNOUNCED 0x02 /* an event for it went to user space (it has an address) */
#define SW_F_RELEASED  0x04 /* the file was closed; a TCP orphan lives on until CLOSE */
#define SW_F_PASSIVE   0x08 /* accepted child of a listener: owner is the listener's */
#define SW_F_STATECB   0x10 /* sockops state callbacks are enabled for it */

/* sw_event.kind */
#define SW_EV_BIND        1 /* post_bind: local address and port set */
#define SW_EV_LISTEN      2 /* sockops TCP_LISTEN_CB (also covers listen without bind) */
#define SW_EV_CONNECT     3 /* sockops TCP_CONNECT_CB: SYN about to go out, port chosen */
#define SW_EV_ESTABLISHED 4 /* sockops ACTIVE_ESTABLISHED_CB */
#define SW_EV_ACCEPT      5 /* sockops PASSIVE_ESTABLISHED_CB: new child socket */
#define SW_EV_STATE       6 /* sockops STATE_CB: old_state -> sock.state */
#define SW_EV_UDP_CONNECT 7 /* connect() on a UDP socket returned 0; local side chosen by the kernel */
#define SW_EV_RELEASE     8 /* close of the last file reference */
#define SW_EV_SENDTO      9 /* first unconnected sendmsg of an autobound UDP socket */

/* Index of the per-CPU counters array: every loss is counted where it happens. */
#define SW_C_RINGBUF_FULL   0 /* an event could not be reserved: user space resyncs from the map */
#define SW_C_MAP_FULL       1 /* a socket could not be added to the table map */
#define SW_C_PENDING_FULL   2 /* a UDP connect could not be remembered between hook and syscall exit */
#define SW_C_EVENTS         3 /* events submitted */
#define SW_C_MAX            4

struct sw_sock {
	__u64 cookie;         /* socket cookie (SO_COOKIE), host order */
	__u64 netns_cookie;   /* network namespace cookie (SO_NETNS_COOKIE), host order */
	__u64 ts_ns;          /* CLOCK_BOOTTIME of the last change, host order */
	__u32 local_addr[4];  /* network order; IPv4 in [0], rest zero */
	__u32 remote_addr[4]; /* network order; IPv4 in [0], rest zero */
	__u32 pid;            /* owner's tgid, 0 = not known yet */
	__u32 uid;            /* owner's uid */
	__u16 local_port;     /* host order, 0 = not bound yet */
	__u16 remote_port;    /* host order, 0 = not connected */
	__u8  family;         /* AF_INET or AF_INET6 */
	__u8  protocol;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  state;          /* kernel TCP_* numbering; UDP: 7 unconnected, 1 connected */
	__u8  flags;          /* SW_F_* */
	char  comm[SW_COMM_LEN]; /* owner's thread name at the hook, NUL padded */
};

struct sw_event {
	struct sw_sock sock;  /* the row after the change */
	__u8  kind;           /* SW_EV_* */
	__u8  old_state;      /* SW_EV_STATE: state before */
	__u16 pad;
	__s32 err;            /* reserved for failed operations, 0 here */
};

/* Remembered between a UDP connect4/6 hook and the exit of that connect(), per thread. */
struct sw_pending {
	__u64 cookie;         /* socket cookie, host order */
};

#endif
