/* udp.bpf.c — connect(): UDP's, and TCP connect()s' owners. Included by sockwatch.bpf.c.
 * cgroup connect4/6 run at every connect(), so they are attached only while someone
 * streams (for UDP connects; a view reads connected UDP sockets from the kernel), except
 * before 6.2, where sockops cannot read the task and they log TCP connect()s' owners.
 *
 * connect() is watched by cgroup connect4/6 (it runs inside connect(), before the
 * kernel picks the local side; user space reads that side from the kernel when a view
 * asks). An unconnected sendto() autobinds silently: watching it would take the cgroup
 * sendmsg hooks, which make the kernel lock the socket on every unconnected send (the
 * DNS, QUIC and syslog servers this tool exists for), and a UDP socket's close takes
 * sock_release, which runs for every socket. So user space reads the kernel's UDP table
 * when a view asks (as ss does, its owners from /proc where no bind or connect named
 * them), and these hooks add what that read cannot know: who bound or connected. */

/* A TCP connect(), in the task that makes it: its owner's pid, into this CPU's owner_log
 * (sockops' TCP_CONNECT_CB where it may read the task, 6.2 on; connect4/6 before). Another
 * connect() on this CPU may preempt this one between two stores; the slot's two cookies
 * then differ (or the later writer's whole slot wins), and user space skips a torn slot. */
static __always_inline void log_tcp_owner(u64 cookie)
{
	u32 cpu = bpf_get_smp_processor_id();
	struct sw_owner_log *l = owner_log.lookup(&cpu);
	if (!l)
		return;
	struct sw_owner_slot *slot = &l->slots[l->head++ & (SW_OWNER_SLOTS - 1)];
	slot->cookie = cookie;
	slot->pid = bpf_get_current_pid_tgid() >> 32;
	slot->cookie_end = cookie;
}

/* A TCP connect(): cgroup connect4/6 run in it just before sockops' TCP_CONNECT_CB, on
 * this CPU unless the task migrates in between (then the cookie does not match, and the
 * connect has no owner, as without this). Only where sockops cannot read the task. */
static __always_inline void leave_connect_owner(struct bpf_sock_addr *ctx, u64 cookie)
{
	u32 zero = 0;
	struct sw_connect_owner *o = connect_owner.lookup(&zero);
	if (!o)
		return;
	o->cookie = cookie;
	o->pid = bpf_get_current_pid_tgid() >> 32;
	o->uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(o->comm, sizeof(o->comm));
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, int v6)
{
	if (ctx->protocol == IPPROTO_TCP) {
		/* attached for TCP only where sockops cannot read the task (else only while
		 * someone streams UDP connects: sockops logs the owner) */
		if (config_get(SW_CFG_CONNECT_OWNER)) {
			u64 cookie = bpf_get_socket_cookie(ctx);
			log_tcp_owner(cookie);
			leave_connect_owner(ctx, cookie);
		}
		return 1;
	}
	if (ctx->protocol != IPPROTO_UDP)
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct sw_event *e = event_new(cookie, SW_EV_UDP_CONNECT, bpf_get_netns_cookie(ctx), ctx->family, IPPROTO_UDP,
				       SW_TCP_ESTABLISHED, 0);
	if (!e)
		return 1;
	zero_addrs(e);
	if (v6) {
		e->remote_addr[0] = ctx->user_ip6[0];
		e->remote_addr[1] = ctx->user_ip6[1];
		e->remote_addr[2] = ctx->user_ip6[2];
		e->remote_addr[3] = ctx->user_ip6[3];
	} else {
		e->remote_addr[0] = ctx->user_ip4;
	}
	e->remote_port = bpf_ntohs(ctx->user_port); /* network order in the low half */
	take_owner(e);
	event_send(e);
	return 1;
}

int sw_connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx, 0); }
int sw_connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx, 1); }
