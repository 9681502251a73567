"""The pure rules behind `ports`, the `live` views and the event stream, one table of
cases each (no root, no kernel)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from sockwatch import events as E
from sockwatch import ports, stream, views
from sockwatch.containers import Container
from sockwatch.events import Event
from sockwatch.filters import build
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState, sort_key
from sockwatch.tally import ports_report

NS = 4026532000


def row(proto=IPPROTO_TCP, state=TcpState.ESTABLISHED, local=("10.0.0.1", 40000), remote=("10.0.0.2", 443), **kw):
    la = ipaddress.ip_address(local[0])
    return SockRow(
        cookie=kw.pop("cookie", hash((proto, state, local, remote)) & 0xFFFFFFFF),
        protocol=proto,
        family=la.version,
        state=state,
        local_address=la,
        local_port=local[1],
        remote_address=ipaddress.ip_address(remote[0]) if remote else None,
        remote_port=remote[1] if remote else 0,
        netns=kw.pop("netns", NS),
        **kw,
    )


# ---- ports -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [("32768\t60999", (32768, 60999)), ("1 1", (1, 1)), ("40000 40009\n", (40000, 40009))],
)
def test_port_range_parses(text, want):
    assert ports.parse_range(text) == want


@pytest.mark.parametrize("text", ["", "1", "60999 32768", "0 10", "1 70000", "a b", "1 2 3", "\u0661 2"])
def test_port_range_refuses(text):
    with pytest.raises(ports.SysctlError):
        ports.parse_range(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [("", set()), ("8080", {8080}), ("9000-9002,8080", {9000, 9001, 9002, 8080}), (" 1 , 2 ", {1, 2})],
)
def test_reserved_ports_parse(text, want):
    assert ports.parse_reserved(text) == want


@pytest.mark.parametrize("text", ["x", "5-3", "1-", "70000", "-1"])
def test_reserved_ports_refuse(text):
    with pytest.raises(ports.SysctlError):
        ports.parse_reserved(text)


@pytest.mark.parametrize(
    ("port", "cls"),
    [(22, "privileged"), (79, "privileged"), (80, "registered"), (8080, "registered"), (32768, "ephemeral"),
     (40000, "reserved"), (60999, "ephemeral"), (61000, "dynamic"), (49151, "ephemeral")],
)  # fmt: skip
def test_port_classes_follow_the_namespace_not_the_textbook(port, cls):
    # a namespace that lets anyone bind from port 80 (ip_unprivileged_port_start=80)
    assert ports.port_class(port, ports.PortRange(32768, 60999, frozenset({40000}), 80)) == cls


def test_classes_are_ranges():
    got = ports.classes(ports.PortRange(40000, 40009, frozenset({40007, 40008, 40009, 40001}), 1024))
    assert got == {"ephemeral": [40000, 40009], "reserved": [[40001, 40001], [40007, 40009]],
                   "privileged": [1, 1023], "registered": [1024, 49151]}  # fmt: skip


def test_pressure_is_per_destination_with_time_wait_apart_and_listeners_subtracted():
    rng = ports.PortRange(40000, 40009, frozenset({40009}))  # 9 usable
    rows = [
        *(row(local=("10.0.0.1", 40000 + i), remote=("10.0.0.2", 443)) for i in range(4)),
        row(state=TcpState.TIME_WAIT, local=("10.0.0.1", 40004), remote=("10.0.0.2", 443)),
        row(local=("10.0.0.1", 40000), remote=("10.0.0.3", 443)),  # same port, other destination: allowed
        row(state=TcpState.LISTEN, local=("0.0.0.0", 40008), remote=None),  # a listener takes a port from all
        row(local=("10.0.0.1", 5000), remote=("10.0.0.9", 40001)),  # accepted: local port outside the range
        row(proto=IPPROTO_UDP, state=TcpState.CLOSE, local=("0.0.0.0", 40002), remote=None),
    ]
    got = ports_report(rows, {NS: rng})["pressure"]
    first = got[0]
    assert (first["remote_address"], first["used"], first["time_wait"], first["available"]) == ("10.0.0.2", 5, 1, 8)
    assert first["percent"] == 62.5
    rest = [(g["protocol"], g["remote_address"], g["used"]) for g in got[1:]]
    assert rest == [("tcp", "10.0.0.3", 1), ("udp", None, 1)]  # 1 of 8 (a listener holds one) before 1 of 9


# ---- views -------------------------------------------------------------------------------


def table() -> list[SockRow]:
    return [
        row(state=TcpState.LISTEN, local=("0.0.0.0", 80), remote=None, pid=1, comm="nginx", cookie=1),
        row(local=("10.0.0.1", 80), remote=("10.0.0.5", 5555), pid=1, comm="nginx", cookie=2, born_ns=5),
        row(local=("10.0.0.1", 80), remote=("10.0.0.6", 5556), pid=1, comm="nginx", cookie=3, born_ns=9),
        row(proto=IPPROTO_UDP, state=TcpState.CLOSE, local=("0.0.0.0", 53), remote=None, pid=2, comm="dns", cookie=4),
        row(state=TcpState.TIME_WAIT, local=("10.0.0.1", 80), remote=("10.0.0.7", 1), cookie=5),
    ]


@pytest.mark.parametrize(
    ("name", "cookies"),
    [("all", {1, 2, 3, 4, 5}), ("listeners", {1, 4}), ("connections", {2, 3, 5})],
)
def test_views_select_what_they_name(name, cookies):
    got = views.view(table(), build(), name, "local", False, 0, 100)
    assert {r["cookie"] for r in got["rows"]} == cookies and got["selected"] == len(cookies)
    assert got["counts"]["total"] == 5 and got["counts"]["listeners"] == 1
    assert got["counts"]["tcp"] == {"ESTAB": 2, "LISTEN": 1, "TIME-WAIT": 1} and got["counts"]["udp"] == {"UNCONN": 1}


@pytest.mark.parametrize("n", [0, 1, 2, 5, 40])
@pytest.mark.parametrize("sort", list(views.SORT_KEYS))
@pytest.mark.parametrize("reverse", [False, True])
def test_a_window_is_the_slice_of_the_full_sort(n, sort, reverse):
    rows = sorted(table() * 20, key=sort_key)  # ties too, in the table's order as the tracker keeps it
    key = views.SORT_KEYS[sort]
    full = (rows[::-1] if reverse else rows) if key is None else sorted(rows, key=key, reverse=reverse)
    for offset in (0, 3):
        assert views.window(rows, sort, reverse, offset, n) == full[offset : offset + n]


def test_processes_group_what_each_holds():
    def fix(rows):  # the owner check also names each shown group's container
        for r in rows:
            r.container = Container("/system.slice/nginx.service", "systemd", "nginx.service") if r.pid == 1 else None

    got = views.view(table(), build(), "processes", "local", False, 0, 10, fix_owners=fix)
    assert got["processes"][0] == {"pid": 1, "comm": "nginx", "listeners": 1, "connections": 2, "udp": 0,
                                   "time_wait": 0, "total": 3, "ports": [80],
                                   "container": {"cgroup": "/system.slice/nginx.service", "runtime": "systemd",
                                                 "id": "nginx.service", "name": None, "pod_namespace": None,
                                                 "pod_name": None, "pod_uid": None}}  # fmt: skip
    assert [(p["pid"], p["total"]) for p in got["processes"]] == [(1, 3), (2, 1), (None, 1)]


def test_a_filter_narrows_the_window_but_not_the_counts():
    got = views.view(table(), build(port=["53"]), "all", "local", False, 0, 100)
    assert [r["cookie"] for r in got["rows"]] == [4] and got["matched"] == 1 and got["counts"]["total"] == 5


# ---- the stream ---------------------------------------------------------------------------


def ev(kind, cookie=7, proto=IPPROTO_TCP, state=7, old=0, local=("127.0.0.1", 0), remote=None, flags=0, err=0,
       comm=b"app", ts=0, pid=10, uid=0):  # fmt: skip
    la = ipaddress.ip_address(local[0])
    return Event(cookie, 1, ts, la.packed.ljust(16, b"\0"),
                 ipaddress.ip_address(remote[0]).packed.ljust(16, b"\0") if remote else bytes(16),
                 pid, uid, local[1], remote[1] if remote else 0,
                 socket.AF_INET if la.version == 4 else socket.AF_INET6, proto, kind, state, old,
                 flags | E.F_OWNER if flags & E.F_LIFETIME == 0 else flags, 0, err, comm.ljust(16, b"\0"))  # fmt: skip


def make(e: Event) -> int:
    return NS  # every record's namespace


@pytest.mark.parametrize(
    ("records", "want"),
    [
        ([ev(E.BIND, local=("127.0.0.1", 80), flags=E.F_PORT_ASKED)], [("bind", "asked")]),
        ([ev(E.BIND, local=("127.0.0.1", 41000))], [("bind", "port 0")]),
        ([ev(E.BIND, local=("127.0.0.1", 0))], [("bind", "no port")]),
        ([ev(E.LISTEN, state=10, local=("0.0.0.0", 41000))], [("listen", "listen")]),
        ([ev(E.BIND, local=("0.0.0.0", 80), flags=E.F_PORT_ASKED), ev(E.LISTEN, state=10, local=("0.0.0.0", 80))],
         [("bind", "asked"), ("listen", None)]),
        ([ev(E.CONNECT, state=2, local=("10.0.0.1", 41000), remote=("10.0.0.2", 80))], [("connect", "connect")]),
        ([ev(E.BIND, local=("10.0.0.1", 0)),
          ev(E.CONNECT, state=2, local=("10.0.0.1", 41000), remote=("10.0.0.2", 80))],
         [("bind", "no port"), ("connect", "connect")]),
        ([ev(E.BIND_FAIL, local=("0.0.0.0", 80), flags=E.F_PORT_ASKED, err=98)], [("bind_fail", "asked")]),
        ([ev(E.STATE, state=4, old=1, remote=("10.0.0.2", 80))], [("state", None)]),
        ([ev(E.STATE, state=7, old=9, remote=("10.0.0.2", 80), flags=E.F_LIFETIME)], [("close", None)]),
        ([ev(E.BIND, proto=IPPROTO_UDP, local=("127.0.0.1", 53), flags=E.F_PORT_ASKED),
          ev(E.RELEASE, proto=IPPROTO_UDP, old=7)], [("bind", "asked"), ("close", None)]),
    ],
)  # fmt: skip
def test_each_record_says_what_happened_and_how_the_port_was_set(records, want):
    d = stream.Describer()
    got = []
    before = None
    for e in records:
        s = d.describe(e, before, make)
        assert s is not None
        got.append((s.kind, s.bind))
        before = s.sock
    assert got == want


def test_the_close_of_a_udp_socket_nothing_saw_with_a_port_is_not_streamed():
    """The close hook may not read the port, so it tells every UDP socket's: one that
    no bind, connect or read showed is in no table, and its close says nothing."""
    assert stream.Describer().describe(ev(E.RELEASE, proto=IPPROTO_UDP, old=7), None, make) is None


def life(acked, received, old, active, born=0, ts=3_000_000_000):
    e = ev(E.STATE, state=7, old=old, remote=("10.0.0.2", 80), flags=E.F_LIFETIME,
           comm=struct.pack("<QQ", acked, received), pid=2, uid=40, ts=ts)  # fmt: skip
    return stream.lifetime(e, born, active)


@pytest.mark.parametrize(
    ("acked", "received", "old", "active", "sent", "got"),
    [
        (12347, 679, TcpState.FIN_WAIT2, True, 12345, 678),  # active opener, active close (measured)
        (679, 12346, TcpState.LAST_ACK, False, 678, 12345),  # passive opener, passive close (measured)
        (100, 50, TcpState.ESTABLISHED, True, 99, 50),  # reset: no FIN either way
        (100, 51, TcpState.CLOSE_WAIT, False, 100, 50),  # peer's FIN, then a reset
        (0, 0, TcpState.SYN_SENT, True, 0, 0),  # refused: the SYN was never acknowledged
    ],
)
def test_lifetime_bytes_are_payload(acked, received, old, active, sent, got):
    got_life = life(acked, received, old, active, born=1_000_000_000)
    assert (got_life["bytes_sent"], got_life["bytes_received"]) == (sent, got)
    assert (got_life["seconds"], got_life["retransmits"], got_life["srtt_us"]) == (2.0, 2, 40)


def test_a_connection_born_unseen_has_no_duration():
    assert life(10, 10, TcpState.ESTABLISHED, False)["seconds"] is None


def test_close_of_an_active_row_counts_its_syn():
    d = stream.Describer()
    conn = d.describe(ev(E.CONNECT, state=2, local=("10.0.0.1", 41000), remote=("10.0.0.2", 80)), None, make)
    assert conn is not None and conn.sock.active
    end = d.describe(ev(E.STATE, state=7, old=1, remote=("10.0.0.2", 80), flags=E.F_LIFETIME,
                        comm=struct.pack("<QQ", 11, 0)), conn.sock, make)  # fmt: skip
    assert end is not None and end.lifetime is not None and end.lifetime["bytes_sent"] == 10


@pytest.mark.parametrize(
    ("holder", "want", "conflict"),
    [
        (("0.0.0.0", 80), ("127.0.0.1", 80), True),
        (("127.0.0.1", 80), ("0.0.0.0", 80), True),
        (("127.0.0.1", 80), ("127.0.0.2", 80), False),
        (("::", 80), ("127.0.0.1", 80), True),  # a dual-stack wildcard holds IPv4 too
        (("0.0.0.0", 80), ("::1", 80), False),
        (("127.0.0.1", 81), ("127.0.0.1", 80), False),
    ],
)
def test_who_holds_a_port_a_bind_asked_for(holder, want, conflict):
    h = (stream.sock_of_row(row(state=TcpState.LISTEN, local=holder, remote=None)), TcpState.LISTEN)
    w = stream.sock_of_row(row(state=TcpState.CLOSE, local=want, remote=None))
    assert (stream.conflicts([h], w) == [h]) is conflict


def test_a_line_is_the_json_a_reader_parses():
    import json

    d = stream.Describer()
    s = d.describe(ev(E.BIND_FAIL, local=("0.0.0.0", 80), flags=E.F_PORT_ASKED, err=98, comm=b'a"b\x1b'), None, make)
    assert s is not None
    s.holders = [(stream.sock_of_row(row(state=TcpState.LISTEN, local=("0.0.0.0", 80), remote=None, pid=7,
                                         comm="nginx")), TcpState.LISTEN)]  # fmt: skip
    got = json.loads(s.json_line(1000.0))
    assert got["kind"] == "bind_fail" and got["errno"] == "EADDRINUSE" and got["comm"] == 'a"b\x1b'
    assert got["state"] is None and got["holders"][0]["pid"] == 7 and got["holders"][0]["state"] == "LISTEN"
    assert got["time"] == 1000.0 and got["bind"] == "asked"
    line = json.loads(stream.lost_line(5, 12.5, "stream"))
    assert line == {"schema_version": 1, "time": 12.5, "kind": "lost", "events": 5, "reason": "stream"}


def test_a_tcp_release_of_a_socket_seen_born_is_not_a_second_close():
    d = stream.Describer()
    conn = d.describe(ev(E.CONNECT, state=2, local=("10.0.0.1", 41000), remote=("10.0.0.2", 80), ts=5), None, make)
    assert conn is not None
    assert d.describe(ev(E.RELEASE, state=1, old=1, flags=E.F_PRESTART), conn.sock, make) is None
    # one from before start (found by a dump: no birth seen) ends at its release
    dumped = conn.sock._replace(born_ns=0)
    assert d.describe(ev(E.RELEASE, state=1, old=1, flags=E.F_PRESTART), dumped, make).kind == "close"
