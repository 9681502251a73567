"""sockwatch.drops: each socket's drops joined from sk_drops and the drop hook, and the
attribution of a listener's unreasoned drops from its namespace's counters (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from sockwatch import drops
from sockwatch.drops import LISTEN_OVERFLOW, NOT_SPECIFIED, Ledger, Netstat, Seen
from sockwatch.filters import Filters
from sockwatch.kernel import drops as kdrops
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState

NS = 4026531840


def udp(cookie: int, n: int, new: bool = True, netns: int = NS) -> Seen:
    return Seen(cookie, netns, False, n, new)


def listener(cookie: int, n: int, new: bool = True, netns: int = NS) -> Seen:
    return Seen(cookie, netns, True, n, new)


def no_netstat(_netns: int) -> Netstat | None:
    raise AssertionError("a namespace's counters are read only when a listener dropped what the hook did not see")


# (what happens, reads: [(sockets, hook counts, the namespace's counters)], the last read's reasons and earlier)
CASES = [
    ("a UDP socket's drops, all seen by the hook",
     [([udp(1, 148)], {1: {"SOCKET_RCVBUFF": 148}}, None)], {1: ({"SOCKET_RCVBUFF": 148}, 0)}),
    ("a UDP socket's drops the hook did not see: the kernel gave no reason",
     [([udp(1, 10)], {1: {"SOCKET_FILTER": 7}}, None)], {1: ({"SOCKET_FILTER": 7, NOT_SPECIFIED: 3}, 0)}),
    ("a socket from before sockwatch: its drops then are earlier, apart from the reasons",
     [([udp(1, 10, new=False)], {}, None), ([udp(1, 15, new=False)], {1: {"SOCKET_RCVBUFF": 5}}, None)],
     {1: ({"SOCKET_RCVBUFF": 5}, 10)}),
    ("a socket from before whose first read already has drops the hook saw",
     [([udp(1, 12, new=False)], {1: {"SOCKET_RCVBUFF": 2}}, None)], {1: ({"SOCKET_RCVBUFF": 2}, 10)}),
    ("a listener's SYNs to a full accept queue: every listen drop in the namespace was an overflow",
     [([listener(1, 24)], {}, Netstat(24, 24))], {1: ({LISTEN_OVERFLOW: 24}, 0)}),
    ("overflows at SYN time and at the handshake's end (the hook sees the second)",
     [([listener(1, 10)], {1: {LISTEN_OVERFLOW: 4}}, Netstat(10, 10))], {1: ({LISTEN_OVERFLOW: 10}, 0)}),
    ("a namespace that once dropped otherwise, read for the first time: not attributed",
     [([listener(1, 8)], {}, Netstat(5, 8))], {1: ({NOT_SPECIFIED: 8}, 0)}),
    ("... then every listen drop since the last read was an overflow",
     [([listener(1, 8)], {}, Netstat(5, 8)), ([listener(1, 12)], {}, Netstat(9, 12))],
     {1: ({NOT_SPECIFIED: 8, LISTEN_OVERFLOW: 4}, 0)}),
    ("one listener grew, and the namespace also dropped otherwise: the overflows it counted, the rest unnamed",
     [([listener(1, 8)], {}, Netstat(5, 8)), ([listener(1, 13)], {}, Netstat(9, 13 + 1))],
     {1: ({NOT_SPECIFIED: 8 + 1, LISTEN_OVERFLOW: 4}, 0)}),
    ("... less the overflows the hook saw (they are in the namespace's count too)",
     [([listener(1, 8)], {}, Netstat(5, 8)),
      ([listener(1, 14)], {1: {LISTEN_OVERFLOW: 2}}, Netstat(10, 14 + 1))],
     {1: ({NOT_SPECIFIED: 8 + 1, LISTEN_OVERFLOW: 2 + 3}, 0)}),
    ("two listeners grew and the namespace dropped otherwise: which was which is not known",
     [([listener(1, 0), listener(2, 0)], {}, Netstat(5, 8)),
      ([listener(1, 3), listener(2, 4)], {}, Netstat(9, 13))],
     {1: ({NOT_SPECIFIED: 3}, 0), 2: ({NOT_SPECIFIED: 4}, 0)}),
    ("two listeners grew, every listen drop an overflow: both overflowed",
     [([listener(1, 3), listener(2, 4)], {}, Netstat(7, 7))],
     {1: ({LISTEN_OVERFLOW: 3}, 0), 2: ({LISTEN_OVERFLOW: 4}, 0)}),
    ("a namespace whose counters cannot be read: not attributed",
     [([listener(1, 3)], {}, None)], {1: ({NOT_SPECIFIED: 3}, 0)}),
    ("read again with nothing new: nothing attributed twice",
     [([listener(1, 24)], {}, Netstat(24, 24)), ([listener(1, 24)], {}, Netstat(24, 24))],
     {1: ({LISTEN_OVERFLOW: 24}, 0)}),
    ("a read where the hook is ahead of sk_drops (read first): nothing negative",
     [([udp(1, 5)], {1: {"SOCKET_RCVBUFF": 7}}, None)], {1: ({"SOCKET_RCVBUFF": 7}, 0)}),
]  # fmt: skip


@pytest.mark.parametrize(("reads", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_ledger_attributes_each_drop_once_and_never_guesses(reads, want):
    ledger = Ledger()
    got: dict = {}
    for socks, hooked, stat in reads:
        got = ledger.update(socks, hooked, lambda _ns, stat=stat: stat)
    assert {c: (d.reasons, d.earlier) for c, d in got.items()} == want
    last = reads[-1][0]
    assert all(got[s.cookie].total == s.drops for s in last)


def test_a_namespaces_counters_are_read_only_when_needed():
    ledger = Ledger()
    ledger.update([udp(1, 3), listener(2, 5)], {2: {LISTEN_OVERFLOW: 5}}, no_netstat)
    ledger.update([udp(1, 4), listener(2, 5)], {2: {LISTEN_OVERFLOW: 5}}, no_netstat)


def test_connections_have_the_hooks_counts_alone():
    got = Ledger().update([udp(1, 0)], {1: {}, 9: {"SOCKET_BACKLOG": 4}}, no_netstat, connections=[9, 10])
    assert (got[9].total, got[9].earlier, got[9].reasons) == (None, 0, {"SOCKET_BACKLOG": 4})
    assert 10 not in got


def test_a_socket_gone_is_forgotten_and_a_new_one_with_its_cookie_starts_again():
    ledger = Ledger()
    ledger.update([udp(1, 10, new=False)], {}, no_netstat)
    ledger.update([], {}, no_netstat)
    got = ledger.update([udp(1, 3)], {1: {"SOCKET_RCVBUFF": 3}}, no_netstat)
    assert (got[1].earlier, got[1].reasons) == (0, {"SOCKET_RCVBUFF": 3})


def test_netstat_parse():
    text = ("TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPBacklogDrop\nTcpExt: 0 24 25 0\n"
            "IpExt: InNoRoutes\nIpExt: 0\n")  # fmt: skip
    assert drops.parse_netstat(text) == Netstat(24, 25)
    assert drops.parse_netstat("IpExt: InNoRoutes\nIpExt: 0\n") is None
    assert drops.parse_netstat("TcpExt: ListenOverflows\nTcpExt: x\n") is None


def _row(cookie: int, proto: int, state: int, port: int, **kw) -> SockRow:
    return SockRow(cookie, proto, 4, state, ipaddress.ip_address("127.0.0.1"), port, netns=NS, **kw)


def test_the_report_puts_the_most_drops_first_with_each_queue():
    u = _row(1, IPPROTO_UDP, 7, 53, recv_q=1664, rmem=1664, rcvbuf=2304, drops=148, pid=5, comm="unbound")
    lst = _row(2, IPPROTO_TCP, TcpState.LISTEN, 80, recv_q=2, send_q=1, drops=300)
    conn = _row(3, IPPROTO_TCP, TcpState.ESTABLISHED, 80, remote_address=ipaddress.ip_address("10.0.0.1"),
                remote_port=5555)  # fmt: skip
    found = [(u, drops.Drops(148, 0, {"SOCKET_RCVBUFF": 148})),
             (lst, drops.Drops(300, 0, {LISTEN_OVERFLOW: 290, NOT_SPECIFIED: 10})),
             (conn, drops.Drops(None, 0, {"SOCKET_BACKLOG": 2}))]  # fmt: skip
    out = drops.report(found, Filters())
    assert [d["cookie"] for d in out] == [2, 1, 3]
    assert out[0]["queue"] == {"kind": "accept", "used": 2, "limit": 1}
    assert out[0]["reasons"] == {LISTEN_OVERFLOW: 290, NOT_SPECIFIED: 10}
    assert out[1]["queue"] == {"kind": "receive", "used": 1664, "limit": 2304, "bytes_queued": 1664}
    assert (out[2]["queue"], out[2]["drops"], out[2]["remote_port"]) == (None, 2, 5555)


@pytest.mark.parametrize(("fmt", "want"), [
    ('{ 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 6, "SOCKET_RCVBUFF" }, { 40, "TCP_LISTEN_OVERFLOW" }, '
     '{ 70, "SOCKET_BACKLOG" }', (1 << 6 | 1 << 40, 1 << (70 - 64))),
    ('print fmt: "skbaddr=%p protocol=%u location=%p"', (0, 0)),
    ('{ 200, "SOCKET_FILTER" }', (0, 0)),  # past what the program's masks hold: not counted
])  # fmt: skip
def test_the_reasons_counted_are_this_kernels_numbers(fmt, want):
    numbers = kdrops.reason_numbers(fmt)
    assert kdrops.masks(numbers) == want
    if numbers.get("SOCKET_RCVBUFF") == 6:
        assert kdrops.missing_reasons(numbers) == ["SOCKET_FILTER", "PROTO_MEM"]
