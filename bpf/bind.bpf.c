/* bind.bpf.c — what a bind() asked for and, when it fails, why. Included by
 * sockwatch.bpf.c.
 *
 * The cgroup bind hooks run inside bind() before the kernel checks the address, with
 * the socket in hand (cookie, namespace); the syscall's exit tracepoint has the errno
 * but no socket. The request waits between the two in `binding`, keyed by the task. A
 * bind that succeeds is reported by post_bind (lifecycle.bpf.c), which reads the
 * request here to tell a port that was asked for from one the kernel chose, and marks
 * it reported; one post_bind never saw (IP_BIND_ADDRESS_NO_PORT) is reported at exit. None of
 * this runs on connect, send or accept: only bind() calls pay for it. */

static __always_inline int on_bind(struct bpf_sock_addr *ctx, int v6)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	u64 id = bpf_get_current_pid_tgid();
	struct sw_bind b = {};
	b.cookie = bpf_get_socket_cookie(ctx);
	b.netns_cookie = bpf_get_netns_cookie(ctx);
	if (v6) {
		b.addr[0] = ctx->user_ip6[0];
		b.addr[1] = ctx->user_ip6[1];
		b.addr[2] = ctx->user_ip6[2];
		b.addr[3] = ctx->user_ip6[3];
	} else {
		b.addr[0] = ctx->user_ip4;
	}
	b.port = bpf_ntohs(ctx->user_port); /* network order in the low half */
	b.family = v6 ? AF_INET6 : AF_INET;
	b.protocol = ctx->protocol;
	/* the options the kernel's bind rules weigh, for `sockwatch explain bind` should it fail */
	int on = 0;
	if (bpf_getsockopt(ctx, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == 0) {
		b.opts = SW_B_KNOWN | (on ? SW_B_REUSEADDR : 0);
		on = 0;
		if (bpf_getsockopt(ctx, SOL_SOCKET, SO_REUSEPORT, &on, sizeof(on)) == 0 && on)
			b.opts |= SW_B_REUSEPORT;
	}
	struct bpf_sock *sk = ctx->sk;
	if (sk && sk->bound_dev_if) {
		b.bound_dev = sk->bound_dev_if;
		b.opts |= SW_B_DEVICE;
	}
	binding.update(&id, &b);
	return 1;
}

int sw_bind4(struct bpf_sock_addr *ctx) { return on_bind(ctx, 0); }
int sw_bind6(struct bpf_sock_addr *ctx) { return on_bind(ctx, 1); }

/* syscalls:sys_exit_bind, laid out as every syscall exit tracepoint is (the common
 * fields, the syscall number, the return value). */
struct sw_sys_exit {
	__u64 common;
	__s32 nr;
	__s32 pad;
	__s64 ret;
};

int sw_bind_exit(struct sw_sys_exit *args)
{
	u64 id = bpf_get_current_pid_tgid();
	struct sw_bind *b = binding.lookup(&id);
	if (!b)
		return 0; /* failed before the bind hook (bad fd, short address): no socket to name */
	/* A failure, or a success post_bind did not report: IP_BIND_ADDRESS_NO_PORT binds
	 * the address only, and the port comes at connect. */
	if (args->ret < 0 || !b->posted) {
		/* tracing programs may not read the coarse clock; the precise one has the same base */
		struct sw_event *e = event_new_at(bpf_ktime_get_ns(), b->cookie, args->ret < 0 ? SW_EV_BIND_FAIL : SW_EV_BIND,
						  b->netns_cookie, b->family, b->protocol, SW_TCP_CLOSE, 0);
		if (e) {
			__builtin_memset(e->remote_addr, 0, sizeof(e->remote_addr));
			if (args->ret < 0) {
				e->bind_opts = b->opts;
				e->remote_addr[0] = b->bound_dev;
			}
			e->local_addr[0] = b->addr[0];
			e->local_addr[1] = b->addr[1];
			e->local_addr[2] = b->addr[2];
			e->local_addr[3] = b->addr[3];
			e->local_port = args->ret < 0 ? b->port : 0;
			e->err = args->ret < 0 ? -args->ret : 0;
			if (b->port)
				e->flags = SW_F_PORT_ASKED;
			take_owner(e);
			event_send(e);
		}
	}
	binding.delete(&id);
	return 0;
}
