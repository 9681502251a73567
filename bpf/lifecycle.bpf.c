/* lifecycle.bpf.c — cgroup sock hooks: creation (owner), bind (local side), release.
 * Included by sockwatch.bpf.c. */

static __always_inline int tracked_proto(u32 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP;
}

/* cgroup/sock_create: runs in socket() in the creating task, so the owner is exact. */
int sw_sock_create(struct bpf_sock *sk)
{
	if (!tracked_proto(sk->protocol))
		return 1;
	struct sw_sock s = {};
	s.cookie = bpf_get_socket_cookie(sk);
	s.netns_cookie = bpf_get_netns_cookie(sk);
	s.ts_ns = bpf_ktime_get_boot_ns();
	s.family = sk->family;
	s.protocol = sk->protocol;
	s.state = SW_TCP_CLOSE;
	take_owner(&s);
	row_insert(&s);
	return 1;
}

/* cgroup/post_bind4 and post_bind6: the local address and port bind() settled on. */
static __always_inline int on_post_bind(struct bpf_sock *sk, int v6)
{
	if (!tracked_proto(sk->protocol))
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	struct sw_sock *s = socks.lookup(&cookie);
	if (!s) {
		/* created before sockwatch: bind runs in the binder's context, so own it here */
		struct sw_sock n = {};
		n.cookie = cookie;
		n.netns_cookie = bpf_get_netns_cookie(sk);
		n.family = sk->family;
		n.protocol = sk->protocol;
		n.state = SW_TCP_CLOSE;
		take_owner(&n);
		s = row_insert(&n);
		if (!s)
			return 1;
	}
	local_from_sock(s, sk, v6);
	s->ts_ns = bpf_ktime_get_boot_ns();
	s->flags |= SW_F_ANNOUNCED;
	emit(s, SW_EV_BIND, 0);
	return 1;
}

int sw_post_bind4(struct bpf_sock *sk) { return on_post_bind(sk, 0); }
int sw_post_bind6(struct bpf_sock *sk) { return on_post_bind(sk, 1); }

/* cgroup/sock_release: the last file reference is gone. UDP sockets and TCP sockets
 * that are not connected go away now; a connected TCP socket lives on as an orphan
 * (FIN-WAIT, LAST-ACK, ...) and leaves the table on its STATE_CB to CLOSE. */
int sw_sock_release(struct bpf_sock *sk)
{
	if (!tracked_proto(sk->protocol))
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	u8 state = sk->state;
	int gone = sk->protocol == IPPROTO_UDP || state == SW_TCP_CLOSE ||
		   state == SW_TCP_LISTEN || state == SW_TCP_SYN_SENT;
	struct sw_sock *s = socks.lookup(&cookie);
	if (!s) {
		/* a socket from before sockwatch: tell user space, it knows it from the dump */
		struct sw_sock n = {};
		n.cookie = cookie;
		n.netns_cookie = bpf_get_netns_cookie(sk);
		n.family = sk->family;
		n.protocol = sk->protocol;
		n.state = state;
		n.flags = SW_F_RELEASED;
		n.ts_ns = bpf_ktime_get_boot_ns();
		/* (release may not read the local address; the cookie is enough) */
		emit(&n, SW_EV_RELEASE, state);
		return 1;
	}
	s->flags |= SW_F_RELEASED;
	s->ts_ns = bpf_ktime_get_boot_ns();
	if (s->flags & SW_F_ANNOUNCED)
		emit(s, SW_EV_RELEASE, state);
	if (gone)
		socks.delete(&cookie);
	return 1;
}
