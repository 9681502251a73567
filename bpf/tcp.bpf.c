/* tcp.bpf.c — sockops: listen, connect, established (both ends), state changes.
 * Included by sockwatch.bpf.c. Sockops callbacks may run in softirq context, so no
 * owner is ever taken here: it comes from sock_create, or from the listener. */

static __always_inline void tuple_from_ops(struct sw_sock *s, struct bpf_sock_ops *o)
{
	if (o->family == AF_INET6) {
		s->local_addr[0] = o->local_ip6[0];
		s->local_addr[1] = o->local_ip6[1];
		s->local_addr[2] = o->local_ip6[2];
		s->local_addr[3] = o->local_ip6[3];
		s->remote_addr[0] = o->remote_ip6[0];
		s->remote_addr[1] = o->remote_ip6[1];
		s->remote_addr[2] = o->remote_ip6[2];
		s->remote_addr[3] = o->remote_ip6[3];
	} else {
		s->local_addr[0] = o->local_ip4;
		s->remote_addr[0] = o->remote_ip4;
	}
	s->local_port = o->local_port;               /* host order */
	s->remote_port = bpf_ntohl(o->remote_port);  /* network order in the high half */
}

static __always_inline int on_tcp(struct bpf_sock_ops *o, u8 kind, u8 state, u8 flags)
{
	u64 cookie = bpf_get_socket_cookie(o);
	struct sw_sock *s = socks.lookup(&cookie);
	if (!s) {
		struct sw_sock n = {};
		n.cookie = cookie;
		n.netns_cookie = bpf_get_netns_cookie(o);
		n.family = o->family;
		n.protocol = IPPROTO_TCP;
		n.flags = flags;
		s = row_insert(&n);
		if (!s)
			return 1;
	}
	tuple_from_ops(s, o);
	s->state = state;
	s->ts_ns = bpf_ktime_get_boot_ns();
	s->flags |= SW_F_ANNOUNCED | SW_F_STATECB;
	bpf_sock_ops_cb_flags_set(o, o->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	emit(s, kind, 0);
	return 1;
}

static __always_inline int on_state(struct bpf_sock_ops *o)
{
	u8 old = o->args[0], new = o->args[1];
	u64 cookie = bpf_get_socket_cookie(o);
	struct sw_sock *s = socks.lookup(&cookie);
	if (!s)
		return 1;
	s->state = new;
	s->ts_ns = bpf_ktime_get_boot_ns();
	/* ->ESTABLISHED is followed at once by ACTIVE_ESTABLISHED_CB: one event is enough */
	if (new == SW_TCP_ESTABLISHED)
		return 1;
	emit(s, SW_EV_STATE, old);
	/* A closed TCP socket is unhashed; its row goes once no file holds it either. */
	if (new == SW_TCP_CLOSE && (s->flags & SW_F_RELEASED))
		socks.delete(&cookie);
	return 1;
}

int sw_sockops(struct bpf_sock_ops *o)
{
	switch (o->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		return on_tcp(o, SW_EV_LISTEN, SW_TCP_LISTEN, 0);
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		return on_tcp(o, SW_EV_CONNECT, SW_TCP_SYN_SENT, 0);
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		return on_tcp(o, SW_EV_ESTABLISHED, SW_TCP_ESTABLISHED, 0);
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return on_tcp(o, SW_EV_ACCEPT, SW_TCP_ESTABLISHED, SW_F_PASSIVE);
	case BPF_SOCK_OPS_STATE_CB:
		return on_state(o);
	}
	return 1;
}
