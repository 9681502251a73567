"""The incremental tally against a recount from scratch (an oracle written apart, the
plain way), after every step of random table changes: counts, listeners, connections
per listener, ephemeral ports per namespace and per destination."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockwatch import ports
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState, fmt_addr
from sockwatch.tally import Shape, Tally, shape

NS = (4026531840, 4026532001)
ADDRS = [ipaddress.ip_address(a) for a in ("0.0.0.0", "10.0.0.1", "10.0.0.2", "::", "::ffff:10.0.0.1", "fd00::1")]
PORTS = [80, 443, 40000, 40001, 40002, 40003, 40008, 5000]
STATES = [TcpState.ESTABLISHED, TcpState.LISTEN, TcpState.TIME_WAIT, TcpState.SYN_SENT, TcpState.CLOSE_WAIT,
          TcpState.CLOSE]  # fmt: skip


def random_row(rnd: random.Random, cookie: int) -> SockRow:
    proto = rnd.choice((IPPROTO_TCP, IPPROTO_UDP))
    local = rnd.choice(ADDRS)
    state = rnd.choice(STATES) if proto == IPPROTO_TCP else rnd.choice((TcpState.CLOSE, TcpState.ESTABLISHED))
    connected = state not in (TcpState.LISTEN, TcpState.CLOSE) or (proto == IPPROTO_UDP and rnd.random() < 0.3)
    peers = [a for a in ADDRS if a.version == local.version and not a.is_unspecified]
    remote = rnd.choice(peers) if connected else None
    return SockRow(
        cookie=cookie, protocol=proto, family=local.version, state=state, local_address=local,
        local_port=rnd.choice([*PORTS, 0]), remote_address=remote,
        remote_port=rnd.choice((443, 53, 8080)) if remote else 0,
        netns=rnd.choice(NS), comm=f"p{cookie}",
    )  # fmt: skip


# ---- the oracle: each figure recounted from the rows, the obvious way --------------------------


def oracle_pressure(rows: list[SockRow], ranges: dict[int, ports.PortRange]) -> list[tuple]:
    default = ports.PortRange(*ports.DEFAULT_RANGE)
    held: dict[int, set[int]] = defaultdict(set)
    for r in rows:
        if r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN:
            held[r.netns].add(r.local_port)
    used: dict[tuple, set[int]] = defaultdict(set)
    tw: Counter = Counter()
    for r in rows:
        rng = ranges.get(r.netns, default)
        if not rng.contains(r.local_port):
            continue
        if r.protocol == IPPROTO_TCP and r.is_connection and r.local_port not in held[r.netns]:
            key = (r.netns, "tcp", fmt_addr(r.local_address), fmt_addr(r.remote_address), r.remote_port)
            used[key].add(r.local_port)
            tw[key] += r.state == TcpState.TIME_WAIT
        elif r.protocol == IPPROTO_UDP:
            used[(r.netns, "udp", fmt_addr(r.local_address), None, None)].add(r.local_port)
    out = []
    for key, ps in used.items():
        rng = ranges.get(key[0], default)
        avail = rng.size - (len({p for p in held[key[0]] if rng.contains(p)}) if key[1] == "tcp" else 0)
        out.append((key, len(ps), tw[key], avail))
    return sorted(out, key=str)


def got_pressure(t: Tally, ranges: dict[int, ports.PortRange]) -> list[tuple]:
    return sorted((((d["netns"], d["protocol"], d["local_address"], d["remote_address"], d["remote_port"]),
                    d["used"], d["time_wait"], d["available"]) for d in t.pressure(ranges)), key=str)  # fmt: skip


def oracle_connections(rows: list[SockRow]) -> dict[int, int]:
    listeners = [r for r in rows if r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN]
    out: Counter = Counter()
    for c in rows:
        if c.protocol != IPPROTO_TCP or not c.is_connection or c.state == TcpState.TIME_WAIT:
            continue
        wild = ipaddress.ip_address("0.0.0.0" if c.family == 4 else "::")
        for want in (c.local_address, wild):  # an accepted socket has its listener's family
            hit = [r for r in listeners if (r.netns, r.local_port, r.local_address) == (c.netns, c.local_port, want)
                   and r.family == c.family]  # fmt: skip
            if hit:
                out[min(hit, key=lambda r: r.cookie).cookie] += 1
                break
    return dict(out)


def check(t: Tally, rows: dict[int, SockRow], ranges: dict[int, ports.PortRange]) -> None:
    visible = [r for r in rows.values() if r.visible]
    assert t.counts == Counter((r.netns, r.protocol, r.family, r.state) for r in visible)
    assert set(t.listening) == {r.cookie for r in visible if (r.state == TcpState.LISTEN if r.protocol == IPPROTO_TCP
                                                              else not r.is_connection)}  # fmt: skip
    assert t.listener_connections(t.listening.values()) == {
        k: v for k, v in oracle_connections(visible).items() if v
    } or _ambiguous(visible)
    assert got_pressure(t, ranges) == oracle_pressure(visible, ranges)
    default = ports.PortRange(*ports.DEFAULT_RANGE)
    for n in t.namespace_summary(ranges):
        rng = ranges.get(n["netns"], default)
        in_ns = {r.local_port for r in visible if r.netns == n["netns"]}
        assert n["in_use"] == len({p for p in in_ns if rng.contains(p)})


def _ambiguous(rows: list[SockRow]) -> bool:
    """Two listeners on one exact (address, port): which takes a connection is the
    kernel's choice (SO_REUSEPORT); the oracle picks one, the tally another."""
    seen = Counter((r.netns, r.family, r.local_address, r.local_port) for r in rows
                   if r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN)  # fmt: skip
    return any(n > 1 for n in seen.values())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_tally_equals_a_recount_after_every_change(seed: int) -> None:
    rnd = random.Random(seed)
    rows: dict[int, SockRow] = {}
    t = Tally(source=rows.values)
    ranges = {NS[0]: ports.PortRange(40000, 40005, frozenset({40004}))}
    # as the tracker keeps them: the shape each changed row had when the tally last looked
    was: dict[int, Shape | None] = {}

    def before_change(c: int) -> None:
        was.setdefault(c, shape(rows[c]) if c in rows else None)

    def look() -> None:
        for c, s in was.items():
            t.update(c, s, rows.get(c))
        was.clear()

    for step in range(80):
        op = rnd.random()
        if op < 0.45 or not rows:
            c = rnd.randrange(1, 40)
            before_change(c)
            rows[c] = random_row(rnd, c)
        elif op < 0.75:  # a row changed in place, as the tracker changes them
            r = rows[rnd.choice(list(rows))]
            before_change(r.cookie)
            r.state = rnd.choice(STATES) if r.protocol == IPPROTO_TCP else r.state
            r.local_port = rnd.choice(PORTS)
            if r.state in (TcpState.LISTEN, TcpState.CLOSE):
                r.remote_address, r.remote_port = None, 0
        elif op < 0.95:
            c = rnd.choice(list(rows))
            before_change(c)
            del rows[c]
        else:  # a namespace's range changed: every figure of it is recomputed
            ranges[NS[1]] = ports.PortRange(40001, 40003 + rnd.randrange(3))
        if step % 10 == 9 or rnd.random() < 0.2:
            look()
            check(t, rows, ranges)
    look()
    check(t, rows, ranges)
    assert len(Tally.of(r for r in rows.values())) == sum(r.visible for r in rows.values())


def test_update_with_the_same_shape_is_free_and_keeps_the_newest_object() -> None:
    rnd = random.Random(7)
    r = random_row(rnd, 1)
    r.protocol, r.state, r.remote_address, r.remote_port, r.local_port = IPPROTO_UDP, TcpState.CLOSE, None, 0, 53
    t = Tally.of([r])
    assert t.listening[1] is r
    v = t.listening_version
    r2 = SockRow(**{f: getattr(r, f) for f in ("cookie", "protocol", "family", "state", "local_address",
                                                 "local_port", "netns")}, comm="renamed")  # fmt: skip
    t.update(1, shape(r), r2)
    assert t.listening[1] is r2 and t.listening_version == v


@pytest.mark.parametrize("top", [1, 2])
def test_pressure_top_is_the_head_of_the_full_list(top: int) -> None:
    rows = [SockRow(cookie=i, protocol=IPPROTO_TCP, family=4, state=TcpState.ESTABLISHED,
                    local_address=ADDRS[1], local_port=40000 + i % (3 + i // 3), remote_address=ADDRS[2],
                    remote_port=443 + i // 3, netns=NS[0]) for i in range(9)]  # fmt: skip
    t = Tally.of(rows)
    assert t.pressure({}, top=top) == t.pressure({})[:top]
