/* loadgen.c — small load generators for the with/without-sockwatch cost benchmark.
 *
 *   loadgen tcp_crr    ADDR PORT SECONDS [RATE]  connect/accept/close cycles (SO_LINGER 0)
 *   loadgen tcp_crr_fin ADDR PORT SECONDS [RATE] the same, closed by FIN: the server first, as a web
 *                                                server closing a request does (its end lingers in
 *                                                TIME-WAIT, up to the kernel's limit)
 *   loadgen udp_sendto ADDR PORT SECONDS         unconnected sendto() of 64-byte datagrams
 *   loadgen udp_send   ADDR PORT SECONDS         connected send() of 64-byte datagrams
 *   loadgen udp_read   ADDR PORT SECONDS         udp_sendto, every datagram read by its server
 *   loadgen udp_churn  ADDR PORT SECONDS [RATE]  socket(), sendto() (autobind), close()
 *
 * Each mode runs in one process (its own listener or sink), for SECONDS or until RATE
 * operations per second have been paced out, and prints one line of JSON:
 *   {"mode": ..., "ops": N, "seconds": S, "rate": N/S}
 * RATE 0 (the default) means as fast as possible. Only loopback addresses are meant.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

static struct sockaddr_in addr_of(const char *ip, int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "loadgen: bad IPv4 address %s\n", ip);
		exit(2);
	}
	return a;
}

/* Sleep until op number `done` is due at `rate` per second after `t0`. */
static void pace(double t0, long done, double rate)
{
	if (rate <= 0)
		return;
	double due = t0 + done / rate, t = now();
	if (due > t) {
		struct timespec ts = {.tv_sec = (time_t)(due - t), .tv_nsec = (long)((due - t - (time_t)(due - t)) * 1e9)};
		nanosleep(&ts, NULL);
	}
}

static long tcp_crr(struct sockaddr_in a, double secs, double rate, int reset)
{
	int one = 1;
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	int l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0)
		die("socket");
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1024))
		die("bind/listen");
	long n = 0;
	double t0 = now(), end = t0 + secs;
	while (now() < end) {
		for (int i = 0; i < 64; i++) {
			int c = socket(AF_INET, SOCK_STREAM, 0);
			if (c < 0)
				die("socket");
			if (connect(c, (struct sockaddr *)&a, sizeof(a)))
				die("connect");
			int s = accept(l, NULL, NULL);
			if (s < 0)
				die("accept");
			if (reset) {
				/* the client resets: no TIME-WAIT, so the port space never runs out */
				setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
				close(c);
				close(s);
			} else {
				close(s); /* FIN-WAIT-1 -> FIN-WAIT-2 -> TIME-WAIT */
				close(c); /* CLOSE-WAIT -> LAST-ACK -> CLOSE */
			}
			n++;
			pace(t0, n, rate);
		}
	}
	close(l);
	return n;
}

static int udp_sink(struct sockaddr_in a)
{
	int s = socket(AF_INET, SOCK_DGRAM, 0), small = 4096;
	if (s < 0)
		die("socket");
	/* never read: datagrams are dropped at the full receive queue, the same way every run */
	setsockopt(s, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	if (bind(s, (struct sockaddr *)&a, sizeof(a)))
		die("bind sink");
	return s;
}

static long udp_send(struct sockaddr_in a, double secs, int connected)
{
	char buf[64] = {0};
	int sink = udp_sink(a);
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	if (s < 0)
		die("socket");
	if (connected && connect(s, (struct sockaddr *)&a, sizeof(a)))
		die("connect");
	long n = 0;
	double end = now() + secs;
	while (now() < end) {
		for (int i = 0; i < 256; i++) {
			ssize_t r = connected ? send(s, buf, sizeof(buf), 0)
					      : sendto(s, buf, sizeof(buf), 0, (struct sockaddr *)&a, sizeof(a));
			if (r < 0 && errno != ENOBUFS && errno != EAGAIN)
				die("send");
			n++;
		}
	}
	close(s);
	close(sink);
	return n;
}

/* A server that keeps up: 64 datagrams sent, then read back, so none is dropped (what a
 * DNS or QUIC server under load does; udp_sendto's sink drops instead). Counts reads. */
static long udp_read(struct sockaddr_in a, double secs)
{
	char buf[64] = {0}, in[2048];
	int sink = socket(AF_INET, SOCK_DGRAM, 0), big = 1 << 22;
	if (sink < 0)
		die("socket");
	setsockopt(sink, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	if (bind(sink, (struct sockaddr *)&a, sizeof(a)))
		die("bind sink");
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	if (s < 0)
		die("socket");
	long sent = 0, got = 0;
	double end = now() + secs;
	while (now() < end) {
		for (int i = 0; i < 64; i++) {
			if (sendto(s, buf, sizeof(buf), 0, (struct sockaddr *)&a, sizeof(a)) < 0)
				die("sendto");
			sent++;
		}
		while (recv(sink, in, sizeof(in), MSG_DONTWAIT) > 0)
			got++;
	}
	if (got != sent) {
		fprintf(stderr, "loadgen: %ld of %ld datagrams read: the server fell behind\n", got, sent);
		exit(1);
	}
	close(s);
	close(sink);
	return got;
}

static long udp_churn(struct sockaddr_in a, double secs, double rate)
{
	char buf[64] = {0};
	int sink = udp_sink(a);
	long n = 0;
	double t0 = now(), end = t0 + secs;
	while (now() < end) {
		for (int i = 0; i < 16; i++) {
			int s = socket(AF_INET, SOCK_DGRAM, 0);
			if (s < 0)
				die("socket");
			if (sendto(s, buf, sizeof(buf), 0, (struct sockaddr *)&a, sizeof(a)) < 0 && errno != ENOBUFS)
				die("sendto");
			close(s);
			n++;
			pace(t0, n, rate);
		}
	}
	close(sink);
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: loadgen tcp_crr|tcp_crr_fin|udp_sendto|udp_send|udp_read|udp_churn ADDR PORT SECONDS [RATE]\n");
		return 2;
	}
	const char *mode = argv[1];
	struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]));
	double secs = atof(argv[4]), rate = argc > 5 ? atof(argv[5]) : 0;
	double t0 = now();
	long n;
	if (!strcmp(mode, "tcp_crr"))
		n = tcp_crr(a, secs, rate, 1);
	else if (!strcmp(mode, "tcp_crr_fin"))
		n = tcp_crr(a, secs, rate, 0);
	else if (!strcmp(mode, "udp_sendto"))
		n = udp_send(a, secs, 0);
	else if (!strcmp(mode, "udp_send"))
		n = udp_send(a, secs, 1);
	else if (!strcmp(mode, "udp_read"))
		n = udp_read(a, secs);
	else if (!strcmp(mode, "udp_churn"))
		n = udp_churn(a, secs, rate);
	else {
		fprintf(stderr, "loadgen: unknown mode %s\n", mode);
		return 2;
	}
	double t = now() - t0;
	printf("{\"mode\": \"%s\", \"ops\": %ld, \"seconds\": %.3f, \"rate\": %.1f}\n", mode, n, t, n / t);
	return 0;
}
