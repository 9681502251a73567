/* udp.bpf.c — what bind() does not show for UDP: connect() (which may autobind) and
 * the autobind of an unconnected sendto(). Included by sockwatch.bpf.c. */

/* cgroup/connect4 and connect6 run before the kernel connects (and autobinds): remember
 * the socket for this thread; the syscall's exit says whether it worked. */
static __always_inline int on_connect(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return 1;
	struct sw_pending p = {};
	p.cookie = bpf_get_socket_cookie(ctx);
	u64 tid = bpf_get_current_pid_tgid();
	if (pending_connect.update(&tid, &p))
		count(SW_C_PENDING_FULL);
	return 1;
}

int sw_connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx); }
int sw_connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx); }

/* The syscall exit has no socket in hand: the event names the cookie, and the tracker
 * reads the local and remote pair the kernel chose from its own table. */
TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	u64 tid = bpf_get_current_pid_tgid();
	struct sw_pending *p = pending_connect.lookup(&tid);
	if (!p)
		return 0;
	u64 cookie = p->cookie;
	pending_connect.delete(&tid);
	if (args->ret != 0)
		return 0;
	struct sw_sock *s = socks.lookup(&cookie);
	if (!s)
		return 0;
	s->state = SW_TCP_ESTABLISHED;
	s->ts_ns = bpf_ktime_get_boot_ns();
	s->flags |= SW_F_ANNOUNCED;
	emit(s, SW_EV_UDP_CONNECT, 0);
	return 0;
}

/* cgroup/sendmsg4 and sendmsg6 run for unconnected UDP sends after the autobind, so
 * the port is in ctx->sk. The common case (port known) costs one hash lookup. */
static __always_inline int on_sendmsg(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct sw_sock *s = socks.lookup(&cookie);
	if (!s || s->local_port)
		return 1;
	local_from_sock(s, sk, sk->family == AF_INET6);
	s->ts_ns = bpf_ktime_get_boot_ns();
	s->flags |= SW_F_ANNOUNCED;
	emit(s, SW_EV_SENDTO, 0);
	return 1;
}

int sw_sendmsg4(struct bpf_sock_addr *ctx) { return on_sendmsg(ctx); }
int sw_sendmsg6(struct bpf_sock_addr *ctx) { return on_sendmsg(ctx); }
