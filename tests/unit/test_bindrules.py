"""sockwatch.bindrules, table by table: the address overlap of inet_rcv_saddr_equal,
the TCP and UDP conflict rules, and the checks before them (pure; the kernel itself
judges them in tests/kernel/test_explain_bind.py)."""

from __future__ import annotations

import ipaddress

import pytest

from sockwatch import bindrules
from sockwatch.bindrules import Bind, Context, Holder, overlap
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, TcpState

A = ipaddress.ip_address
LISTEN, ESTAB, TW, UNCONN = TcpState.LISTEN, TcpState.ESTABLISHED, TcpState.TIME_WAIT, TcpState.CLOSE


def fam(a: str) -> int:
    return 6 if ":" in a else 4


# (socket 1: addr, v6only; socket 2: addr, v6only) -> socket 1 binding competes with socket 2
OVERLAP = [
    (("0.0.0.0", False), ("127.0.0.1", False), True),
    (("127.0.0.1", False), ("127.0.0.2", False), False),
    (("127.0.0.1", False), ("::", False), True),  # a dual-stack :: takes IPv4
    (("127.0.0.1", False), ("::", True), False),  # ... an IPV6_V6ONLY one does not
    (("::", True), ("0.0.0.0", False), False),
    (("::", False), ("0.0.0.0", False), True),
    (("::", True), ("::", False), True),  # both ::, whatever IPV6_V6ONLY says
    (("::", True), ("::1", False), True),
    (("::1", False), ("127.0.0.1", False), False),
    (("::ffff:127.0.0.1", False), ("127.0.0.1", False), True),  # v4-mapped compares as IPv4
    (("::ffff:127.0.0.1", False), ("0.0.0.0", False), True),
    (("::ffff:127.0.0.1", False), ("::", True), False),
    (("::ffff:127.0.0.1", False), ("::", False), True),
    (("127.0.0.6", False), ("::1", False), True),  # LOOPBACK4_IPV6: a :: socket connect() gave ::1
    (("0.0.0.0", False), ("::1", False), True),
    (("0.0.0.0", False), ("::1", True), False),  # bind() to ::1 itself sets IPV6_V6ONLY
    (("fd00::1", False), ("::1", False), False),
]  # fmt: skip


@pytest.mark.parametrize(("one", "two", "want"), OVERLAP, ids=[f"{a[0]}-{b[0]}" for a, b, _ in OVERLAP])
def test_addresses_overlap_as_the_kernel_compares_them(one, two, want):
    assert overlap(fam(one[0]), A(one[0]), one[1], fam(two[0]), A(two[0]), two[1]) is want
    if not (two == ("::1", False) and fam(one[0]) == 4):  # (LOOPBACK4_IPV6 is compared one way: from IPv4)
        assert overlap(fam(two[0]), A(two[0]), two[1], fam(one[0]), A(one[0]), one[1]) is want  # symmetric


def holder(addr: str, state: int = LISTEN, proto: int = IPPROTO_TCP, **kw) -> Holder:
    return Holder(7, proto, fam(addr), state, A(addr), 8080, **kw)


# (protocol, holders, the bind asked) -> errno (None: succeeds), certain
RULES = [
    ("wildcard against a specific listener", IPPROTO_TCP, [holder("127.0.0.1")], Bind(IPPROTO_TCP, A("0.0.0.0"), 8080),
     "EADDRINUSE", True),
    ("SO_REUSEADDR never shares with a listener", IPPROTO_TCP, [holder("0.0.0.0", reuseaddr=True)],
     Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseaddr=True), "EADDRINUSE", True),
    ("SO_REUSEADDR on both, the other not listening", IPPROTO_TCP, [holder("0.0.0.0", ESTAB, reuseaddr=True)],
     Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseaddr=True), None, True),
    ("SO_REUSEADDR on one only", IPPROTO_TCP, [holder("127.0.0.1", ESTAB)],
     Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseaddr=True), "EADDRINUSE", True),
    ("SO_REUSEPORT on both, one owner", IPPROTO_TCP, [holder("0.0.0.0", reuseport=True, uid=5)],
     Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseport=True, uid=5), None, True),
    ("SO_REUSEPORT on both, two owners (the fast path may remember another)", IPPROTO_TCP,
     [holder("0.0.0.0", reuseport=True, uid=5)], Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseport=True, uid=6),
     "EADDRINUSE", False),
    ("SO_REUSEPORT against TIME-WAIT needs no same owner", IPPROTO_TCP,
     [holder("127.0.0.1", TW, reuseport=True, uid=5)], Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseport=True, uid=6),
     None, True),
    ("TIME-WAIT holds the port", IPPROTO_TCP, [holder("127.0.0.1", TW, reuseaddr=None, reuseport=None)],
     Bind(IPPROTO_TCP, A("0.0.0.0"), 8080), "EADDRINUSE", True),
    ("TIME-WAIT with SO_REUSEADDR asked: hangs on its own flag", IPPROTO_TCP,
     [holder("127.0.0.1", TW, reuseaddr=None, reuseport=None)], Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, reuseaddr=True),
     "EADDRINUSE", False),
    ("another device", IPPROTO_TCP, [holder("0.0.0.0", bound_dev=2)],
     Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, bound_dev=3), None, True),
    ("a device against none", IPPROTO_TCP, [holder("0.0.0.0")], Bind(IPPROTO_TCP, A("0.0.0.0"), 8080, bound_dev=3),
     "EADDRINUSE", True),
    ("IPv6-only beside IPv4", IPPROTO_TCP, [holder("0.0.0.0")], Bind(IPPROTO_TCP, A("::"), 8080, v6only=True),
     None, True),
    ("UDP: SO_REUSEADDR on both shares any state", IPPROTO_UDP, [holder("0.0.0.0", ESTAB, IPPROTO_UDP, reuseaddr=True)],
     Bind(IPPROTO_UDP, A("0.0.0.0"), 8080, reuseaddr=True), None, True),
    ("UDP: the first competing socket on the chain decides", IPPROTO_UDP,
     [holder("0.0.0.0", UNCONN, IPPROTO_UDP, reuseport=True), holder("127.0.0.1", UNCONN, IPPROTO_UDP)],
     Bind(IPPROTO_UDP, A("0.0.0.0"), 8080, reuseport=True), None, True),
    ("UDP: ... in that order", IPPROTO_UDP,
     [holder("127.0.0.1", UNCONN, IPPROTO_UDP), holder("0.0.0.0", UNCONN, IPPROTO_UDP, reuseport=True)],
     Bind(IPPROTO_UDP, A("0.0.0.0"), 8080, reuseport=True), "EADDRINUSE", True),
    ("UDP: an IPv6 SO_REUSEPORT socket sits at the chain's tail", IPPROTO_UDP,
     [holder("127.0.0.1", UNCONN, IPPROTO_UDP), holder("::", UNCONN, IPPROTO_UDP, reuseport=True)],
     Bind(IPPROTO_UDP, A("0.0.0.0"), 8080, reuseport=True), "EADDRINUSE", True),
    ("UDP: two families at the chain's head, bound at times not known", IPPROTO_UDP,
     [holder("127.0.0.1", UNCONN, IPPROTO_UDP, reuseport=True), holder("::1", UNCONN, IPPROTO_UDP)],
     Bind(IPPROTO_UDP, A("::"), 8080, reuseport=True), "EADDRINUSE", False),
]  # fmt: skip


@pytest.mark.parametrize(("proto", "holders", "ask", "errno", "certain"), [r[1:] for r in RULES],
                         ids=[r[0] for r in RULES])  # fmt: skip
def test_the_conflict_rules(proto, holders, ask, errno, certain):
    v = bindrules.check(ask, holders)
    assert (v.errno, v.certain) == (errno, certain), v.steps
    if errno == "EADDRINUSE":
        assert v.conflicts and all(c.holder in holders for c in v.conflicts)


def test_the_checks_before_the_port_owners():
    ctx = Context(frozenset({ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")}))
    assert bindrules.check(Bind(IPPROTO_TCP, A("10.0.0.1"), 8080), [], ctx).errno == "EADDRNOTAVAIL"
    assert bindrules.check(Bind(IPPROTO_TCP, A("127.9.9.9"), 8080), [], ctx).errno is None  # all of 127/8 is local
    assert bindrules.check(Bind(IPPROTO_TCP, A("::ffff:127.0.0.1"), 8080, v6only=True), [], ctx).errno == "EINVAL"
    assert bindrules.check(Bind(IPPROTO_TCP, A("0.0.0.0"), 80, can_bind_service=False), [], ctx).errno == "EACCES"
    assert bindrules.check(Bind(IPPROTO_TCP, A("0.0.0.0"), 80), [], ctx).errno is None
    got = bindrules.check(Bind(IPPROTO_UDP, A("0.0.0.0"), 40000), [], Context(reserved=frozenset({40000})))
    assert got.errno is None and len(got.notes) == 2  # in the ephemeral range, and reserved
    assert bindrules.check(Bind(IPPROTO_TCP, A("0.0.0.0"), 0), [holder("0.0.0.0")]).errno is None


def test_local_addresses_from_proc():
    fib = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.1.0.0
        /24 link UNICAST
     |-- 10.1.0.1
        /32 host LOCAL
     |-- 10.1.0.255
        /32 link BROADCAST
Local:
  +-- 127.0.0.0/8 2 0 2
     |-- 127.0.0.0
        /8 host LOCAL
"""
    inet6 = "00000000000000000000000000000001 01 80 10 80       lo\nfd000000000000000000000000000001 05 40 00 80 d0\n"
    got = bindrules.local_addresses(fib, inet6)
    assert got == {ipaddress.ip_network(n) for n in ("10.1.0.1/32", "10.1.0.255/32", "127.0.0.0/8", "::1/128",
                                                      "fd00::1/128")}  # fmt: skip
