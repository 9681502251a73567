/* lifecycle.bpf.c — cgroup sock hooks: creation, bind, release. Included by
 * sockwatch.bpf.c. TCP needs none of them on its hot path: sockops sees every TCP
 * socket that gets an address (listen, connect, accept) and every state change after,
 * so these return at once for TCP except to catch sockets from before sockwatch. */

/* cgroup/sock_create: runs in socket() in the creating task, so the owner is exact.
 * Only UDP keeps it (udp.bpf.c says why). */
int sw_sock_create(struct bpf_sock *sk)
{
	if (sk->protocol != IPPROTO_UDP)
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	struct sw_udp u = {};
	u.netns_cookie = bpf_get_netns_cookie(sk);
	u.pid = bpf_get_current_pid_tgid() >> 32;
	u.uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(u.comm, sizeof(u.comm));
	if (udp_socks.update(&cookie, &u))
		count(SW_C_MAP_FULL);
	else
		count(SW_C_UDP_CREATED);
	return 1;
}

/* cgroup/post_bind4 and post_bind6: the local address and port bind() settled on. A TCP
 * bind goes to the event stream only (a bound TCP socket is in no lookup table until it
 * listens or connects, and sockops reports both with the address). */
static __always_inline int on_post_bind(struct bpf_sock *sk, int v6)
{
	if (sk->protocol != IPPROTO_UDP && sk->protocol != IPPROTO_TCP)
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	if (sk->protocol == IPPROTO_UDP)
		udp_announce(cookie);
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

/* cgroup/sock_release: the last file reference is gone. A UDP socket leaves the table
 * now. A TCP socket reports its end through its state callbacks (a connected one lives
 * on as an orphan until CLOSE), except one from before sockwatch started, which has no
 * state callbacks: those are told apart by cookie (user space sets the bound). */
int sw_sock_release(struct bpf_sock *sk)
{
	u8 state = sk->state;
	u8 flags = 0;
	u64 cookie;
	if (sk->protocol == IPPROTO_UDP) {
		cookie = bpf_get_socket_cookie(sk);
		struct sw_udp *u = udp_socks.lookup(&cookie);
		if (u) {
			int told = u->flags & SW_U_ANNOUNCED;
			udp_socks.delete(&cookie);
			if (!told) {
				count(SW_C_UDP_SILENT_GONE);
				return 1;
			}
		}
		/* announced, or not in the map (from before sockwatch, or the map was full) */
		goto tell;
	}
	/* TCP: only a listener's end matters here (connections are read from the kernel when
	 * a view asks); one from before sockwatch has no state callbacks to tell it */
	if (sk->protocol != IPPROTO_TCP || state != SW_TCP_LISTEN)
		return 1;
	cookie = bpf_get_socket_cookie(sk);
	flags = SW_F_PRESTART;
tell:;
	struct sw_event *e = event_new(cookie, SW_EV_RELEASE, bpf_get_netns_cookie(sk), sk->family,
				       sk->protocol, state, state);
	if (!e)
		return 1;
	zero_addrs(e);
	e->flags = flags;
	event_send(e);
	return 1;
}
