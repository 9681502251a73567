/* lifecycle.bpf.c — cgroup sock hooks: bind and release. Included by sockwatch.bpf.c.
 * TCP needs none of them on its hot path: sockops sees every TCP socket that gets an
 * address (listen, connect, accept) and every state change after. */

/* cgroup/post_bind4 and post_bind6: the local address and port bind() settled on. A TCP
 * bind goes to the event stream only (a bound TCP socket is in no lookup table until it
 * listens or connects, and sockops reports both with the address). */
static __always_inline int on_post_bind(struct bpf_sock *sk, int v6)
{
	if (sk->protocol != IPPROTO_UDP && sk->protocol != IPPROTO_TCP)
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	struct sw_event *e = event_new(cookie, SW_EV_BIND, bpf_get_netns_cookie(sk), sk->family, sk->protocol,
				       SW_TCP_CLOSE, 0);
	if (!e)
		return 1;
	__builtin_memset(e->remote_addr, 0, sizeof(e->remote_addr));
	local_from_sock(e, sk, v6);
	u64 id = bpf_get_current_pid_tgid();
	struct sw_bind *b = binding.lookup(&id);
	if (b) {
		b->posted = 1;
		if (b->port)
			e->flags = SW_F_PORT_ASKED;
	}
	take_owner(e);
	event_send(e);
	return 1;
}

int sw_post_bind4(struct bpf_sock *sk) { return on_post_bind(sk, 0); }
int sw_post_bind6(struct bpf_sock *sk) { return on_post_bind(sk, 1); }

/* cgroup/sock_release: the last file reference is gone. Attached only while someone
 * streams events (user space attaches and detaches it): it runs for every socket, and
 * what it tells the table (a UDP socket or a listener gone) a view reads from the kernel
 * anyway. Every UDP socket's is told (this hook may not read the port, so user space
 * passes over those that never had one); a TCP socket reports its end through its state
 * callbacks (a connected one lives on as an orphan until CLOSE), except a listener from
 * before sockwatch started, which has none. */
int sw_sock_release(struct bpf_sock *sk)
{
	u8 state = sk->state;
	u8 flags = 0;
	if (sk->protocol != IPPROTO_UDP) {
		if (sk->protocol != IPPROTO_TCP || state != SW_TCP_LISTEN)
			return 1;
		flags = SW_F_PRESTART;
	}
	struct sw_event *e = event_new(bpf_get_socket_cookie(sk), SW_EV_RELEASE, bpf_get_netns_cookie(sk), sk->family,
				       sk->protocol, state, state);
	if (!e)
		return 1;
	zero_addrs(e);
	e->flags = flags;
	event_send(e);
	return 1;
}
