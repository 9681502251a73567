"""The lookup hook's pure parts: the per-namespace program patch, what is read from the
kernel's text files, and the views' join of counts with the table."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sockwatch import lookups, metrics
from sockwatch.filters import Filters, from_wire
from sockwatch.kernel import drops, lookup
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState

A = ipaddress.ip_address


def _ld_imm64(value: int, dst: int = 1, src: int = 0) -> bytes:
    return struct.pack("<BBhI", 0x18, (src << 4) | dst, 0, value & 0xFFFFFFFF) + struct.pack(
        "<BBhI", 0, 0, 0, value >> 32
    )


EXIT = struct.pack("<BBhi", 0x95, 0, 0, 0)


def test_the_marker_is_patched_once_with_the_namespace_cookie() -> None:
    code = _ld_imm64(7, src=1) + _ld_imm64(lookup.MAGIC) + EXIT  # a map fd load, then the marker
    same, at = lookup.template(code)
    assert at == 16
    out = lookup.patched(same, at, 0x1122334455667788)
    assert out[:16] == code[:16] and out[-8:] == EXIT
    assert out[16:32] == _ld_imm64(0x1122334455667788)


@pytest.mark.parametrize("code", [EXIT, _ld_imm64(lookup.MAGIC) * 2 + EXIT, _ld_imm64(lookup.MAGIC, src=1) + EXIT])
def test_a_program_without_exactly_one_marker_is_refused(code: bytes) -> None:
    with pytest.raises(lookup.TemplateError):
        lookup.template(code)


def test_the_no_socket_reason_comes_from_the_format_file() -> None:
    fmt = 'print fmt: "...", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "X" })'
    assert drops.reason_numbers(fmt).get("NO_SOCKET") == 3
    assert drops.reason_numbers('print fmt: "skbaddr=%p protocol=%u location=%p"') == {}


def test_drop_sites_span_each_function_to_the_next_symbol() -> None:
    text = "\n".join([
        "ffffffff81000000 T _stext",
        "ffffffff82000100 T tcp_v4_rcv",
        "ffffffff82000900 t tcp_v4_helper",
        "ffffffff82001000 T __udp4_lib_rcv",
        "ffffffff82001400 T udp_rcv",
        "ffffffff82001800 d some_data",
        "ffffffff82002000 T udp_rcv_next",
        "ffffffffc0000000 t tcp_v6_rcv\t[some_module]",
    ])  # fmt: skip
    assert lookup.drop_sites(text) == [
        (0xFFFFFFFF82000100, 0xFFFFFFFF82000900),
        (0xFFFFFFFF82001000, 0xFFFFFFFF82001400),
        (0xFFFFFFFF82001400, 0xFFFFFFFF82002000),
    ]
    hidden = "0000000000000000 T tcp_v4_rcv\n0000000000000000 T udp_rcv\n"
    assert lookup.drop_sites(hidden) == []


def _row(cookie: int, proto: int, addr: str, port: int, state: int, pid: int = 100, netns: int = 1,
         remote: str | None = None, rport: int = 0) -> SockRow:  # fmt: skip
    a = A(addr)
    return SockRow(cookie, proto, a.version, state, a, port, A(remote) if remote else None, rport, netns=netns,
                   pid=pid, comm=f"p{pid}")  # fmt: skip


UNCONN = 7
TABLE = [
    _row(1, IPPROTO_UDP, "0.0.0.0", 53, UNCONN, pid=10),
    _row(2, IPPROTO_UDP, "127.0.0.53", 53, UNCONN, pid=20),
    _row(3, IPPROTO_UDP, "10.0.0.1", 53, 1, pid=30, remote="10.0.0.9", rport=5000),  # connected: never looked up
    _row(4, IPPROTO_TCP, "0.0.0.0", 80, TcpState.LISTEN, pid=40),
    _row(5, IPPROTO_TCP, "0.0.0.0", 80, TcpState.LISTEN, pid=41),  # a reuseport group (listen would refuse else)
    _row(6, IPPROTO_TCP, "::", 443, TcpState.LISTEN, pid=50),
    _row(7, IPPROTO_UDP, "0.0.0.0", 53, UNCONN, pid=60, netns=2),
]


def _dest(proto: int, addr: str, port: int, lookups_: int, misses: int = 0, netns: int = 1) -> lookups.Destination:
    a = A(addr)
    return lookups.Destination(netns, proto, a.version, a, port, lookups_, misses)


COUNTS = [
    _dest(IPPROTO_UDP, "127.0.0.53", 53, 100),
    _dest(IPPROTO_UDP, "10.0.0.1", 53, 40),
    _dest(IPPROTO_TCP, "127.0.0.1", 80, 7),
    _dest(IPPROTO_TCP, "127.0.0.1", 443, 3),  # a v4 SYN to a dual-stack listener
    _dest(IPPROTO_TCP, "127.0.0.1", 22, 5, 5),
    _dest(IPPROTO_TCP, "127.0.0.2", 22, 2, 2),
    _dest(IPPROTO_UDP, "127.0.0.1", 9, 1, 1),
    _dest(IPPROTO_UDP, "127.0.0.1", 53, 4, netns=2),
]


def _by_key(out: list[dict]) -> dict[tuple, dict]:
    return {(d["netns"], d["protocol"], d["address"], d["port"]): d for d in out}


def test_each_destination_goes_to_the_socket_the_kernel_picks() -> None:
    out = lookups.destinations(COUNTS, TABLE, Filters())
    assert [d["lookups"] for d in out] == sorted((d["lookups"] for d in out), reverse=True)
    got = _by_key(out)
    cookies = {k: [s["cookie"] for s in d["sockets"]] for k, d in got.items()}
    assert cookies[(1, "udp", "127.0.0.53", 53)] == [2]  # the bound address over the wildcard
    assert cookies[(1, "udp", "10.0.0.1", 53)] == [1]  # the connected socket is not a candidate
    assert sorted(cookies[(1, "tcp", "127.0.0.1", 80)]) == [4, 5] and got[(1, "tcp", "127.0.0.1", 80)]["reuseport"]
    assert cookies[(1, "tcp", "127.0.0.1", 443)] == [6]  # v4 on the dual-stack listener
    assert cookies[(1, "tcp", "127.0.0.1", 22)] == [] and cookies[(1, "udp", "127.0.0.1", 9)] == []
    assert cookies[(2, "udp", "127.0.0.1", 53)] == [7]  # the namespace's own socket, not netns 1's
    assert got[(1, "udp", "127.0.0.53", 53)]["sockets"][0]["pid"] == 20


def test_closed_ports_sum_misses_per_port() -> None:
    closed = lookups.closed_ports(lookups.destinations(COUNTS, TABLE, Filters()))
    assert [(c["protocol"], c["port"], c["misses"], c["addresses"], c["open_now"]) for c in closed] == [
        ("tcp", 22, 7, 2, False),
        ("udp", 9, 1, 1, False),
    ]


def test_filters_apply_as_to_the_table() -> None:
    f = from_wire({"protocol": ["udp"], "port": ["53"]})
    assert {(d["netns"], d["address"]) for d in lookups.destinations(COUNTS, TABLE, f)} == {
        (1, "127.0.0.53"), (1, "10.0.0.1"), (2, "127.0.0.1")}  # fmt: skip
    assert [d["address"] for d in lookups.destinations(COUNTS, TABLE, from_wire({"pid": ["20"]}))] == ["127.0.0.53"]
    assert lookups.destinations(COUNTS, TABLE, from_wire({"netns": ["3"]})) == []


def test_peers_are_joined_with_the_socket_they_reach() -> None:
    found = [
        lookups.Peer(1, 4, A("127.0.0.53"), 53, A("10.1.1.1"), 4000, 12, 1000.0),
        lookups.Peer(1, 4, A("192.0.2.1"), 53, A("10.1.1.2"), 4001, 30, 999.0),
        lookups.Peer(1, 4, A("127.0.0.1"), 9, A("10.1.1.3"), 4002, 1, 998.0),
    ]
    out = lookups.peers(found, TABLE, Filters())
    assert [(p["remote_port"], p["packets"], [s["cookie"] for s in p["sockets"]]) for p in out] == [
        (4001, 30, [1]),
        (4000, 12, [2]),
        (4002, 1, []),
    ]
    assert [p["remote_port"] for p in lookups.peers(found, TABLE, from_wire({"port": ["4000"]}))] == [4000]


def test_metrics_cap_each_lookup_family_and_sum_the_rest() -> None:
    sample = metrics.LookupSample(COUNTS, {(1, "127.0.0.53", "53"): 2, (1, "0.0.0.0", "53"): 1}, hooked=2,
                                  uncounted=3, unattributed=1, peers_evicted=4)  # fmt: skip
    c = metrics.SockwatchCollector(
        tally=lambda: None,  # type: ignore[arg-type,return-value]
        port_ranges=dict,
        bind_failures=dict,
        binds=dict,
        health=metrics.Health,
        limits=metrics.Limits(lookups=2),
        lookups=lambda: sample,
    )
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    looked = {(s.labels["netns"], s.labels["protocol"], s.labels["address"], s.labels["port"]): s.value
              for s in fams["sockwatch_socket_lookups"].samples}  # fmt: skip
    assert looked[("1", "udp", "127.0.0.53", "53")] == 100 and looked[("1", "udp", "10.0.0.1", "53")] == 40
    assert looked[("1", "tcp", "other", "other")] == 7 + 3 + 5 + 2 and looked[("2", "udp", "other", "other")] == 4
    assert sum(looked.values()) == sum(d.lookups for d in COUNTS)
    missed = {(s.labels["protocol"], s.labels["port"]): s.value for s in fams["sockwatch_socket_lookup_misses"].samples}
    assert missed == {("tcp", "22"): 7, ("udp", "9"): 1}
    capped = {s.labels["family"]: s.value for s in fams["sockwatch_series_capped"].samples}
    assert capped["sockwatch_socket_lookups"] == len(COUNTS) - 2
    values = {s.name: s.value for f in fams.values() for s in f.samples}
    assert values["sockwatch_socket_lookups_uncounted_total"] == 3
    assert values["sockwatch_udp_peers_evicted_total"] == 4
    assert values["sockwatch_lookup_namespaces_hooked"] == 2


def test_a_miss_line_is_json_the_events_text_can_say() -> None:
    import json

    from sockwatch import stream
    from sockwatch.cli import events

    e = json.loads(stream.miss_line(1700000000.5, 4026531840, IPPROTO_TCP, 8081, 4, ["127.0.0.1", "::1"]))
    assert e == {"schema_version": 1, "time": 1700000000.5, "kind": "miss", "netns": 4026531840, "protocol": "tcp",
                 "local_address": "127.0.0.1", "local_port": 8081, "misses": 4,
                 "addresses": ["127.0.0.1", "::1"]}  # fmt: skip
    text = events.describe(e)
    assert "MISS" in text and "port 8081: 4 packets found no socket (RST)" in text and "netns 4026531840" in text


@pytest.mark.parametrize(
    ("in_map", "cached", "last", "expect"),
    [
        # the map's and every CPU's slots holding the key, added
        ([(b"a", 5, 1)], [(b"a", 2, 0), (b"a", 3, 1)], {}, {b"a": (10, 2)}),
        # only in a slot yet
        ([], [(b"b", 1, 1)], {}, {b"b": (1, 1)}),
        # a slot written back between the two reads: neither read saw its 4; the count
        # stays at what was returned before, not below
        ([(b"a", 5, 0)], [], {b"a": (9, 0)}, {b"a": (9, 0)}),
        # and the next read, with the 4 in the map, goes on from there
        ([(b"a", 9, 0), (b"c", 1, 0)], [(b"a", 1, 0)], {b"a": (9, 0)}, {b"a": (10, 0), b"c": (1, 0)}),
    ],
)
def test_add_up_counts_of_the_map_and_the_caches(in_map, cached, last, expect) -> None:
    assert lookup.add_up(in_map, cached, last) == expect
    assert last == expect | {k: v for k, v in last.items() if k not in expect}
