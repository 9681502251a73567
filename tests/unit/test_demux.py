"""The kernel's lookup order as pure rules: one table of cases, each the socket (or
group) the kernel picks and the reason (no root; the real packets are in
tests/kernel/test_explain.py)."""

from __future__ import annotations

import ipaddress

import pytest

from sockwatch.demux import OTHER_DEV, Packet, Sock, lookup
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, TcpState

A = ipaddress.ip_address
L, E, C = TcpState.LISTEN, TcpState.ESTABLISHED, TcpState.CLOSE


def tcp(cookie, local, port=80, state=L, remote=None, rport=0, **kw):
    a = A(local)
    return Sock(cookie, IPPROTO_TCP, a.version, state, a, port, A(remote) if remote else None, rport, **kw)


def udp(cookie, local, port=53, remote=None, rport=0, **kw):
    a = A(local)
    return Sock(cookie, IPPROTO_UDP, a.version, E if remote else C, a, port, A(remote) if remote else None, rport,
                **kw)  # fmt: skip


def pkt(proto, dst, dport, src="10.0.0.9", sport=40000, dev=0):
    return Packet(proto, A(dst), dport, A(src), sport, dev)


CASES = [
    # (name, packet, sockets, expected cookies, reason)
    ("exact address beats wildcard", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "0.0.0.0"), tcp(2, "10.0.0.1")], {2}, "listener"),
    ("wildcard when no exact", pkt(IPPROTO_TCP, "10.0.0.2", 80), [tcp(1, "0.0.0.0"), tcp(2, "10.0.0.1")], {1},
     "listener"),
    ("established 4-tuple first", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "10.0.0.1"), tcp(3, "10.0.0.1", state=E, remote="10.0.0.9", rport=40000)], {3}, "established"),
    ("a new SYN on a TIME-WAIT 4-tuple goes on to the listener", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "0.0.0.0"), tcp(3, "10.0.0.1", state=TcpState.TIME_WAIT, remote="10.0.0.9", rport=40000)], {1},
     "listener"),
    ("with no listener the TIME-WAIT socket answers", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(3, "10.0.0.1", state=TcpState.TIME_WAIT, remote="10.0.0.9", rport=40000)], {3}, "time-wait"),
    ("another peer's connection is not it", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "0.0.0.0"), tcp(3, "10.0.0.1", state=E, remote="10.0.0.9", rport=40001)], {1}, "listener"),
    ("dual-stack :: takes IPv4", pkt(IPPROTO_TCP, "10.0.0.1", 80), [tcp(1, "::")], {1}, "listener"),
    ("v6only :: does not", pkt(IPPROTO_TCP, "10.0.0.1", 80), [tcp(1, "::", v6only=True)], set(), "nothing"),
    ("AF_INET beats dual-stack at the same slot", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "::"), tcp(2, "0.0.0.0")], {2}, "listener"),
    ("a v4-mapped bind is an exact v4 address", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "0.0.0.0"), tcp(2, "::ffff:10.0.0.1")], {2}, "listener"),
    ("IPv6 to ::", pkt(IPPROTO_TCP, "fd00::1", 80, src="fd00::9"), [tcp(1, "0.0.0.0"), tcp(2, "::")], {2},
     "listener"),
    ("reuseport group: one of its members", pkt(IPPROTO_TCP, "10.0.0.1", 80),
     [tcp(1, "0.0.0.0", reuseport=True), tcp(2, "0.0.0.0", reuseport=True), tcp(3, "::")], {1, 2}, "listener"),
    ("a device-bound listener wins on its device", pkt(IPPROTO_TCP, "10.0.0.1", 80, dev=3),
     [tcp(1, "0.0.0.0"), tcp(2, "0.0.0.0", bound_dev=3)], {2}, "listener"),
    ("and is skipped on another", pkt(IPPROTO_TCP, "10.0.0.1", 80, dev=4),
     [tcp(1, "0.0.0.0"), tcp(2, "0.0.0.0", bound_dev=3)], {1}, "listener"),
    ("closed TCP port: RST", pkt(IPPROTO_TCP, "10.0.0.1", 81), [tcp(1, "0.0.0.0")], set(), "nothing"),
    ("UDP exact beats wildcard", pkt(IPPROTO_UDP, "127.0.0.53", 53), [udp(1, "0.0.0.0"), udp(2, "127.0.0.53")], {2},
     "bound"),
    ("UDP connected to this peer first", pkt(IPPROTO_UDP, "10.0.0.1", 53),
     [udp(1, "10.0.0.1"), udp(2, "10.0.0.1", remote="10.0.0.9", rport=40000)], {2}, "connected"),
    ("UDP connected elsewhere never takes it", pkt(IPPROTO_UDP, "10.0.0.1", 53),
     [udp(2, "10.0.0.1", remote="10.0.0.8", rport=40000), udp(1, "0.0.0.0")], {1}, "bound"),
    ("UDP exact unconnected beats a wildcard connected to another", pkt(IPPROTO_UDP, "10.0.0.1", 53),
     [udp(1, "10.0.0.1"), udp(2, "0.0.0.0", remote="10.0.0.9", rport=1)], {1}, "bound"),
    ("UDP closed port: ICMP", pkt(IPPROTO_UDP, "10.0.0.1", 54), [udp(1, "0.0.0.0")], set(), "nothing"),
    ("UDP dual-stack takes v4, AF_INET preferred", pkt(IPPROTO_UDP, "10.0.0.1", 53),
     [udp(1, "::"), udp(2, "0.0.0.0")], {2}, "bound"),
    ("UDP reuseport group", pkt(IPPROTO_UDP, "10.0.0.1", 53),
     [udp(1, "0.0.0.0", reuseport=True), udp(2, "0.0.0.0", reuseport=True)], {1, 2}, "bound"),
    ("UDP v4-mapped packet form", pkt(IPPROTO_UDP, "::ffff:10.0.0.1", 53), [udp(2, "0.0.0.0")], {2}, "bound"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "p", "socks", "want", "reason"), CASES, ids=[c[0] for c in CASES])
def test_lookup_order(name, p, socks, want, reason):
    v = lookup(p, socks)
    assert {s.cookie for s in v.sockets} == want and v.reason == reason, v.steps
    assert v.steps and (v.answer != "") == (not want)
    assert v.reuseport == (len(want) > 1 and all(s.reuseport for s in v.sockets))


def test_another_sk_lookup_program_is_said_to_steer():
    v = lookup(pkt(IPPROTO_TCP, "10.0.0.1", 80), [tcp(1, "0.0.0.0")], other_sk_lookup=True)
    assert any("sk_lookup" in s for s in v.steps)


def test_connected_udp_sockets_sharing_a_4_tuple_are_one_of():
    socks = [udp(1, "10.0.0.1", remote="10.0.0.9", rport=40000, reuseport=True),
             udp(2, "::ffff:10.0.0.1", remote="::ffff:10.0.0.9", rport=40000, reuseport=True)]  # fmt: skip
    v = lookup(pkt(IPPROTO_UDP, "10.0.0.1", 53), socks)
    assert {s.cookie for s in v.sockets} == {1, 2} and v.reason == "connected" and not v.reuseport


# Listeners bound to devices (SO_BINDTODEVICE) with the ingress device not given: the
# answer depends on where the packet arrives, and each case is the kernel's lookup with
# that device (a bound socket takes only its device's packets; +1 over an unbound one).
BY_DEVICE = [
    # (name, packet, sockets, {ifindex or OTHER_DEV: expected cookies})
    ("three wildcard listeners, each on its own device (not a SO_REUSEADDR tie)",
     pkt(IPPROTO_TCP, "10.77.0.1", 9101, dev=0),
     [tcp(1, "0.0.0.0", 9101, bound_dev=5), tcp(2, "0.0.0.0", 9101, bound_dev=1), tcp(3, "0.0.0.0", 9101, bound_dev=7)],
     {5: {1}, 1: {2}, 7: {3}, OTHER_DEV: set()}),
    ("a bound listener over an unbound one on its device only",
     pkt(IPPROTO_TCP, "10.0.0.1", 80), [tcp(1, "0.0.0.0", bound_dev=5), tcp(2, "0.0.0.0")],
     {5: {1}, OTHER_DEV: {2}}),
    ("an IPv6 link-local listener bound to its device (fe80::1%vA0)",
     pkt(IPPROTO_TCP, "fe80::1", 9103, src="fe80::2"), [tcp(1, "fe80::1", 9103, bound_dev=5)],
     {5: {1}, OTHER_DEV: set()}),
    ("UDP: a bound socket takes its device's datagrams, +4",
     pkt(IPPROTO_UDP, "10.0.0.1", 53), [udp(1, "10.0.0.1", bound_dev=5), udp(2, "0.0.0.0")],
     {5: {1}, OTHER_DEV: {2}}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "p", "socks", "want"), BY_DEVICE, ids=[c[0] for c in BY_DEVICE])
def test_sockets_bound_to_devices_answer_per_device(name, p, socks, want):
    v = lookup(p, socks, dev_names={5: "vA0", 1: "lo", 7: "vB0"})
    assert v.reason == "by-device", v.steps
    assert {d: {s.cookie for s in c.sockets} for d, c in v.by_device.items()} == want
    assert not any("SO_REUSEADDR" in step for step in v.steps), v.steps
    assert any("arriving on vA0" in step for step in v.steps), v.steps
    # a given device is that one case
    for d, cookies in want.items():
        got = lookup(Packet(p.protocol, p.dst, p.dport, p.src, p.sport, d), socks)
        assert {s.cookie for s in got.sockets} == cookies and got.reason != "by-device"


def test_where_the_device_changes_nothing_it_is_one_answer():
    # no socket on the port is bound to a device
    socks = [tcp(1, "0.0.0.0", 80), tcp(2, "10.0.0.1", 80), tcp(3, "0.0.0.0", 81, bound_dev=5)]
    v = lookup(pkt(IPPROTO_TCP, "10.0.0.1", 80), socks)
    assert v.reason == "listener" and [s.cookie for s in v.sockets] == [2] and not v.by_device
    # one is, but it cannot take this packet (another 4-tuple): every device gives the same
    socks = [tcp(1, "10.0.0.1", 80), tcp(2, "10.0.0.1", 80, state=E, remote="10.0.0.7", rport=1, bound_dev=5)]
    v = lookup(pkt(IPPROTO_TCP, "10.0.0.1", 80), socks, dev_names={5: "vA0"})
    assert v.reason == "listener" and [s.cookie for s in v.sockets] == [1] and not v.by_device
    assert "the same on every device (vA0, any other device)" in v.steps
