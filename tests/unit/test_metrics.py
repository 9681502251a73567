"""The collector on a fresh registry with injected sources (no root, no agent), read
back with get_sample_value as prometheus_client's own tests do."""

from __future__ import annotations

import ipaddress

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sockwatch import metrics, ports
from sockwatch.containers import Container
from sockwatch.drops import Drops
from sockwatch.lookups import Destination
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState
from sockwatch.tally import Tally, shape

NS = 4026532000


def row(proto, state, local, remote=None, pid=None, comm=None, cookie=0, netns=NS, container=None, **kw):
    la = ipaddress.ip_address(local[0])
    return SockRow(cookie=cookie, protocol=proto, family=la.version, state=state, local_address=la,
                   local_port=local[1], remote_address=ipaddress.ip_address(remote[0]) if remote else None,
                   remote_port=remote[1] if remote else 0, netns=netns, pid=pid, comm=comm,
                   container=container, **kw)  # fmt: skip


TABLE = [
    row(
        IPPROTO_TCP,
        TcpState.LISTEN,
        ("0.0.0.0", 443),
        pid=1,
        comm="nginx",
        cookie=1,
        container=Container("/kubepods/pod1/abc", "containerd", "a" * 64, "web", "shop", "front-0", "1"),
        recv_q=3,
        send_q=511,
        drops=20,
    ),
    row(IPPROTO_TCP, TcpState.ESTABLISHED, ("10.0.0.1", 443), ("10.0.0.9", 40000), cookie=2),
    row(IPPROTO_TCP, TcpState.ESTABLISHED, ("10.0.0.1", 443), ("10.0.0.9", 40001), cookie=3),
    row(IPPROTO_TCP, TcpState.TIME_WAIT, ("10.0.0.1", 443), ("10.0.0.9", 40002), cookie=4),
    row(
        IPPROTO_UDP,
        TcpState.CLOSE,
        ("127.0.0.53", 53),
        pid=2,
        comm="resolved",
        cookie=5,
        recv_q=0,
        send_q=0,
        rmem=2304,
        rcvbuf=212992,
        drops=7,
    ),
    row(IPPROTO_TCP, TcpState.ESTABLISHED, ("10.0.0.1", 40010), ("10.0.0.7", 5432), pid=3, comm="app", cookie=6),
]


def registry(rows=TABLE, limits=None, fail=None) -> CollectorRegistry:
    def tally_source():
        if fail == "sockets":
            raise RuntimeError("boom")
        return Tally.of(rows)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(
        metrics.SockwatchCollector(
            tally=tally_source,
            port_ranges=lambda: {NS: ports.PortRange(32768, 60999, frozenset({40010}))},
            bind_failures=lambda: {(IPPROTO_TCP, 443, "EADDRINUSE"): 3},
            binds=lambda: {(IPPROTO_TCP, 443): 7, (IPPROTO_TCP, 0): 3, (IPPROTO_UDP, 53): 4, (IPPROTO_UDP, -1): 2},
            health=lambda: metrics.Health(
                events_lost={"ring": 5, "stream": 7},
                kernel_reads=12,
                repairs={"added": 2},
                reconciles=9,
                programs_attached=10,
                cpu_seconds=1.5,
                events=1000,
                version="0.1.0",
                revision="0123456789ab",
                tcp_opened=40000,
                bpf_programs={"sockops": (120, 6000), "cgroup connect4": (0, 0)},
            ),
            limits=limits,
            lookups=lambda: metrics.LookupSample(
                [
                    Destination(NS, IPPROTO_UDP, 4, ipaddress.ip_address("127.0.0.1"), 53, 40, 0),
                    Destination(NS, IPPROTO_TCP, 4, ipaddress.ip_address("127.0.0.1"), 22, 9, 9),
                ],
                {(NS, "127.0.0.1", "53"): 3},
                hooked=1,
            ),
            drops=lambda: metrics.DropSample(
                [
                    (rows[0], Drops(20, 0, {"TCP_LISTEN_OVERFLOW": 18, "NOT_SPECIFIED": 2})),
                    (rows[4], Drops(7, 2, {"SOCKET_RCVBUFF": 5})),
                ],
                uncounted=1,
            ),
        )
    )
    return reg


def test_drops_by_socket_and_reason_and_the_queues():
    v = registry().get_sample_value
    where = {"netns": str(NS), "protocol": "tcp", "address": "0.0.0.0", "port": "443"}
    assert v("sockwatch_socket_drops_total", where | {"reason": "TCP_LISTEN_OVERFLOW"}) == 18
    assert v("sockwatch_socket_drops_total", where | {"reason": "NOT_SPECIFIED"}) == 2
    udp = {"netns": str(NS), "protocol": "udp", "address": "127.0.0.53", "port": "53", "reason": "SOCKET_RCVBUFF"}
    assert v("sockwatch_socket_drops_total", udp) == 5  # since sockwatch watched it: not the 2 before
    assert v("sockwatch_socket_drops_uncounted_total") == 1
    at = {"netns": str(NS), "address": "0.0.0.0", "port": "443"}
    assert (v("sockwatch_listen_queue_length", at), v("sockwatch_listen_queue_limit", at)) == (3, 511)
    at = {"netns": str(NS), "address": "127.0.0.53", "port": "53"}
    assert v("sockwatch_udp_receive_memory_bytes", at) == 2304
    assert v("sockwatch_udp_receive_buffer_bytes", at) == 212992
    assert v("sockwatch_listen_queue_length", at) is None


def test_sockets_by_namespace_protocol_family_and_state():
    reg = registry()
    v = reg.get_sample_value
    labels = {"netns": str(NS), "protocol": "tcp", "family": "ipv4"}
    assert v("sockwatch_sockets", labels | {"state": "ESTAB"}) == 3
    assert v("sockwatch_sockets", labels | {"state": "LISTEN"}) == 1
    assert v("sockwatch_sockets", labels | {"state": "TIME-WAIT"}) == 1
    assert v("sockwatch_sockets", labels | {"protocol": "udp", "state": "UNCONN"}) == 1


def test_who_owns_each_port_and_its_connections():
    v = registry().get_sample_value
    nginx = {"netns": str(NS), "protocol": "tcp", "address": "0.0.0.0", "port": "443", "port_class": "privileged",
             "comm": "nginx", "container": "web", "pod": "shop/front-0"}  # fmt: skip
    assert v("sockwatch_listener_info", nginx) == 1
    dns = {"netns": str(NS), "protocol": "udp", "address": "127.0.0.53", "port": "53", "port_class": "privileged",
           "comm": "resolved", "container": "", "pod": ""}  # fmt: skip
    assert v("sockwatch_listener_info", dns) == 1
    # the two accepted on the wildcard listener; TIME-WAIT is not a connection any more, and the
    # app's own outgoing connection is on no listener
    assert v("sockwatch_listener_connections", {"netns": str(NS), "address": "0.0.0.0", "port": "443"}) == 2
    assert v("sockwatch_listener_connections", {"netns": str(NS), "address": "10.0.0.1", "port": "443"}) is None


def test_bind_counters_ports_and_health():
    v = registry().get_sample_value
    assert v("sockwatch_binds_total", {"protocol": "tcp", "port": "443"}) == 7
    assert v("sockwatch_binds_total", {"protocol": "tcp", "port": "0"}) == 3  # the kernel chose
    assert v("sockwatch_binds_total", {"protocol": "udp", "port": "other"}) == 2  # past the cap
    assert v("sockwatch_bind_failures_total", {"protocol": "tcp", "port": "443", "errno": "EADDRINUSE"}) == 3
    assert v("sockwatch_events_lost_total", {"reason": "ring"}) == 5
    assert v("sockwatch_events_lost_total", {"reason": "stream"}) == 7
    assert v("sockwatch_kernel_reads_total") == 12
    assert v("sockwatch_programs_attached") == 10
    assert v("sockwatch_build_info", {"version": "0.1.0", "revision": "0123456789ab"}) == 1
    assert v("sockwatch_tcp_connections_opened_total") == 40000
    assert v("sockwatch_bpf_program_runs_total", {"hook": "sockops"}) == 120
    assert v("sockwatch_bpf_program_run_seconds_total", {"hook": "sockops"}) == 6e-6
    assert v("sockwatch_bpf_program_runs_total", {"hook": "cgroup connect4"}) == 0
    dest = {"netns": str(NS), "protocol": "tcp", "local_address": "10.0.0.1", "remote_address": "10.0.0.7",
            "remote_port": "5432"}  # fmt: skip
    # port 40010 is reserved: not ephemeral, so that connection uses none of the range
    assert v("sockwatch_ephemeral_destination_used_ratio", dest) is None
    assert v("sockwatch_ephemeral_ports_used_ratio", {"netns": str(NS)}) == 0.0
    assert v("sockwatch_scrape_source_error", {"source": "sockets"}) == 0


def test_caps_cut_series_and_say_how_many():
    many = [row(IPPROTO_UDP, TcpState.CLOSE, ("0.0.0.0", 1000 + i), cookie=100 + i) for i in range(50)]
    reg = registry(rows=many, limits=metrics.Limits(listeners=10, destinations=1))
    text = generate_latest(reg).decode()
    assert text.count("sockwatch_listener_info{") == 10
    assert reg.get_sample_value("sockwatch_series_capped", {"family": "sockwatch_listener_info"}) == 40


def test_a_failing_source_leaves_the_others():
    reg = registry(fail="sockets")
    assert reg.get_sample_value("sockwatch_scrape_source_error", {"source": "sockets"}) == 1
    assert reg.get_sample_value("sockwatch_binds_total", {"protocol": "tcp", "port": "443"}) == 7
    assert reg.get_sample_value("sockwatch_sockets", {"netns": str(NS), "protocol": "tcp", "family": "ipv4",
                                                      "state": "ESTAB"}) is None  # fmt: skip


@pytest.mark.parametrize(
    ("comm", "label"),
    [
        ('a"b', 'a"b'),
        ("x\\ny", "x\\ny"),
        ("ünï", "ünï"),
        # control characters are escaped as the table views escape them (\\xNN): a
        # dashboard or a terminal showing the label runs no escape sequence
        ("\x1b]2;PWN\x07\x1b[31m", "\\x1b]2;PWN\\x07\\x1b[31m"),
        ("tab\there\n\x9b", "tab\\x09here\\x0a\\x9b"),
    ],
)
def test_the_exposition_parses_whatever_a_process_is_called(comm, label):
    rows = [row(IPPROTO_TCP, TcpState.LISTEN, ("0.0.0.0", 80), pid=1, comm=comm, cookie=1)]
    text = generate_latest(registry(rows=rows)).decode()
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["sockwatch_listener_info"].samples
    assert sample.labels["comm"] == label


def test_a_change_shows_at_the_next_scrape():
    """Families are built from the tally at each scrape: nothing is served stale."""
    t = Tally.of(TABLE)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.SockwatchCollector(tally=lambda: t, port_ranges=dict, bind_failures=dict, binds=dict,
                                            health=metrics.Health))  # fmt: skip
    labels = {"netns": str(NS), "protocol": "udp", "family": "ipv4", "state": "UNCONN"}
    assert reg.get_sample_value("sockwatch_sockets", labels) == 1
    extra = row(IPPROTO_UDP, TcpState.CLOSE, ("127.0.0.1", 9999), cookie=99)
    t.update(99, None, extra)
    assert reg.get_sample_value("sockwatch_sockets", labels) == 2
    t.update(5, shape(next(r for r in TABLE if r.cookie == 5)), None)
    t.update(99, shape(extra), None)
    assert reg.get_sample_value("sockwatch_sockets", labels) is None


def test_dropped_labels_merge_series_by_summing():
    many = [row(IPPROTO_UDP, TcpState.CLOSE, ("0.0.0.0", 1000 + i), comm=f"w{i % 3}", cookie=100 + i,
                netns=NS + i % 2) for i in range(12)]  # fmt: skip
    reg = registry(rows=many, limits=metrics.Limits(drop_labels=frozenset({"port", "address", "netns"})))
    v = reg.get_sample_value
    base = {"protocol": "udp", "port_class": "privileged", "container": "", "pod": ""}
    assert [v("sockwatch_listener_info", base | {"comm": f"w{i}"}) for i in range(3)] == [4, 4, 4]
    assert v("sockwatch_sockets", {"protocol": "udp", "family": "ipv4", "state": "UNCONN"}) == 12
    text = generate_latest(reg).decode()
    assert 'port="' not in text.split("sockwatch_listener_info")[1].split("\n# ")[0]


def test_owners_are_checked_for_the_shown_listeners_only():
    many = [row(IPPROTO_UDP, TcpState.CLOSE, ("0.0.0.0", 1000 + i), cookie=100 + i) for i in range(30)]
    seen: list[int] = []
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.SockwatchCollector(
        tally=lambda: Tally.of(many), port_ranges=dict, bind_failures=dict, binds=dict, health=metrics.Health,
        limits=metrics.Limits(listeners=7), fix_owners=lambda rows: seen.extend(r.cookie for r in rows),
    ))  # fmt: skip
    generate_latest(reg)
    assert seen == list(range(100, 107))
