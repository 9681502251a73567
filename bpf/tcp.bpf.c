/* tcp.bpf.c — sockops: listen, connect, accept, state changes. Included by
 * sockwatch.bpf.c.
 *
 * Connections are the host's hot path, and their rows are read from the kernel when a
 * view asks (sock_diag, with the owner connect() stored: udp.bpf.c), so what a
 * connection costs here is one per-CPU count per callback (the table's generation: an
 * unchanged count means an unchanged table) and, only while someone streams events, its
 * records. Listeners are few and always reported.
 *
 * TCP_LISTEN_CB and TCP_CONNECT_CB run inside listen() and connect(), so the owner is
 * the current task; PASSIVE_ESTABLISHED_CB and STATE_CB may run in softirq, so they
 * carry no owner (an accepted socket belongs to its listener's owner, in user space).
 * The active side's ->ESTABLISHED is not streamed: connect and accept say enough. */

static __always_inline void tuple_from_ops(struct sw_event *e, struct bpf_sock_ops *o)
{
	if (o->family == AF_INET6) {
		e->local_addr[0] = o->local_ip6[0];
		e->local_addr[1] = o->local_ip6[1];
		e->local_addr[2] = o->local_ip6[2];
		e->local_addr[3] = o->local_ip6[3];
		e->remote_addr[0] = o->remote_ip6[0];
		e->remote_addr[1] = o->remote_ip6[1];
		e->remote_addr[2] = o->remote_ip6[2];
		e->remote_addr[3] = o->remote_ip6[3];
	} else {
		zero_addrs(e);
		e->local_addr[0] = o->local_ip4;
		e->remote_addr[0] = o->remote_ip4;
	}
	e->local_port = o->local_port;               /* host order */
	e->remote_port = bpf_ntohl(o->remote_port);  /* network order in the high half */
}

/* Where sockops cannot read the task: the owner cgroup connect4/6 left for this socket
 * (udp.bpf.c), if it is this socket's; they log it too. */
static __always_inline void owner_left_by_connect(struct sw_event *e)
{
	u32 zero = 0;
	struct sw_connect_owner *o = connect_owner.lookup(&zero);
	if (!o || o->cookie != e->cookie)
		return;
	o->cookie = 0;
	e->pid = o->pid;
	e->uid = o->uid;
	__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	e->flags |= SW_F_OWNER;
}

/* Someone streams events: connection records go to the ring. */
static __always_inline int streaming(void)
{
	return config_get(SW_CFG_STREAM) != 0;
}

static __always_inline int on_tcp(struct bpf_sock_ops *o, u8 kind, u8 state, int owner)
{
	/* every later state change of this socket calls back (on_state) */
	bpf_sock_ops_cb_flags_set(o, o->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	if (kind != SW_EV_LISTEN) {
		count(SW_C_TCP_CHANGES);
		count(SW_C_TCP_OPENED);
		if (owner && kind == SW_EV_CONNECT)
			log_tcp_owner(bpf_get_socket_cookie(o)); /* in connect(): the task is the owner */
		if (!streaming())
			return 1;
	}
	struct sw_event *e = event_new(bpf_get_socket_cookie(o), kind, bpf_get_netns_cookie(o), o->family,
				       IPPROTO_TCP, state, 0);
	if (!e)
		return 1;
	tuple_from_ops(e, o);
	if (owner)
		take_owner(e);
	else if (kind == SW_EV_CONNECT)
		owner_left_by_connect(e);
	event_send(e);
	return 1;
}

static __always_inline int on_state(struct bpf_sock_ops *o)
{
	u8 old = o->args[0], new = o->args[1];
	/* a listener's end changes what receives packets: always told */
	if (old != SW_TCP_LISTEN) {
		count(SW_C_TCP_CHANGES);
		/* ->ESTABLISHED: an accept is reported by its own callback, a connect by its own */
		if (new == SW_TCP_ESTABLISHED || !streaming())
			return 1;
	}
	struct sw_event *e = event_new(bpf_get_socket_cookie(o), SW_EV_STATE, bpf_get_netns_cookie(o), o->family,
				       IPPROTO_TCP, new, old);
	if (!e)
		return 1;
	tuple_from_ops(e, o);
	if (new == SW_TCP_CLOSE) { /* the connection's totals, as tcplife reports them */
		e->flags = SW_F_LIFETIME;
		e->life.bytes_acked = o->bytes_acked;
		e->life.bytes_received = o->bytes_received;
		e->pid = o->total_retrans;
		e->uid = o->srtt_us >> 3; /* the kernel keeps it times 8 */
	}
	event_send(e);
	return 1;
}

static __always_inline int sockops(struct bpf_sock_ops *o, int owners)
{
	switch (o->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		return on_tcp(o, SW_EV_LISTEN, SW_TCP_LISTEN, owners);
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		return on_tcp(o, SW_EV_CONNECT, SW_TCP_SYN_SENT, owners);
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return on_tcp(o, SW_EV_ACCEPT, SW_TCP_ESTABLISHED, 0);
	case BPF_SOCK_OPS_STATE_CB:
		return on_state(o);
	}
	return 1;
}

int sw_sockops(struct bpf_sock_ops *o) { return sockops(o, 1); }

/* For kernels whose sockops may not read the current task (bpf_get_current_pid_tgid and
 * _comm came to sockops in 6.2; Debian 12's 6.1 refuses them): the same events without
 * owners, which user space then reads from /proc. */
int sw_sockops_no_owner(struct bpf_sock_ops *o) { return sockops(o, 0); }
