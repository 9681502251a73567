"""Which socket the kernel hands an arriving packet to, and why: the lookup order of
net/ipv4/inet_hashtables.c (TCP), net/ipv4/udp.c and their IPv6 twins, as pure rules
over a list of sockets (no I/O, no root). Line references are to Linux 6.x.

TCP (__inet_lookup, inet_hashtables.c):
  1. __inet_lookup_established: the exact 4-tuple (a connection, TIME-WAIT included).
  2. BPF sk_lookup programs in the namespace may pick a socket (inet_lookup_run_sk_lookup).
  3. inet_lhash2_lookup(daddr): listeners bound to the destination address; only if
     there is none, inet_lhash2_lookup(INADDR_ANY): the wildcard listeners. In a slot
     the highest compute_score wins: +1 with a bound device (it must be the ingress
     one), +1 for an AF_INET socket over a dual-stack AF_INET6 one (IPv4 packets); an
     IPV6_V6ONLY socket never takes IPv4. The first SO_REUSEPORT socket reaching the
     best score hands the packet to a member of its group (reuseport_select_sock:
     a hash of the 4-tuple, or the group's BPF program).
  4. Nothing: the packet is answered with RST.
UDP (__udp4_lib_lookup, udp.c):
  1. udp4_lib_lookup2(daddr): sockets bound to the destination address, scored by
     compute_score: AF_INET 2 over dual-stack 1; a connected socket must match the
     source (+4 address, +4 port); a bound device must match (+4). A connected winner
     ends the lookup.
  2. BPF sk_lookup programs.
  3. The unconnected winner of step 1, else udp4_lib_lookup2(INADDR_ANY).
  4. Nothing: ICMP port unreachable.
Scores tie on sk_incoming_cpu (+1 where the socket last received): not knowable from
outside, so ties are reported as "one of".

A socket bound to a device (SO_BINDTODEVICE) only takes packets arriving on it. When
the ingress device is not given and such sockets are candidates, the lookup is made for
each device they are bound to and for any other device; if those differ, the verdict is
"by-device" with each case.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, TcpState

if TYPE_CHECKING:
    from sockwatch.kernel.sockdiag import DiagSock

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_ANY6 = ipaddress.IPv6Address(0)
OTHER_DEV = -1  # Packet.dev: a device none of the sockets is bound to


@dataclass(frozen=True)
class Sock:
    """What the lookup knows of a socket (sock_diag gives all of it but reuseport)."""

    cookie: int
    protocol: int
    family: int  # 4 or 6: the socket's own family
    state: int
    local: Address
    port: int
    remote: Address | None = None
    remote_port: int = 0
    v6only: bool = False
    bound_dev: int = 0  # SO_BINDTODEVICE ifindex; 0: any
    reuseport: bool = False
    uid: int = 0  # a reuseport group is one owner's (uid_eq in inet_reuseport_add_sock)


@dataclass(frozen=True)
class Packet:
    protocol: int
    dst: Address
    dport: int
    src: Address | None = None
    sport: int = 0
    dev: int = 0  # the ingress interface's ifindex; 0: unknown; OTHER_DEV: one no socket is bound to


@dataclass
class Verdict:
    sockets: list[Sock]  # the one socket; several: one of them (a reuseport group, or a tie); none: nothing
    reason: str  # "established", "time-wait", "listener", "connected", "bound", "nothing"
    steps: list[str] = field(default_factory=list)  # each look the kernel takes, in order
    reuseport: bool = False  # the kernel picks one member of `sockets` per flow
    answer: str = ""  # with no socket: what the sender gets back
    by_device: dict[int, Verdict] = field(default_factory=dict)  # "by-device": ifindex (OTHER_DEV) -> verdict


def listener_order(family: int, local: Address) -> tuple[tuple[int, Address], tuple[int, Address]]:
    """The (family, address) of the listener that accepted a connection, in the order the
    kernel looks: its exact address, then the wildcard (inet_lhash2_lookup daddr, then
    INADDR_ANY). An accepted socket has its listener's family (an IPv4 connection on a
    dual-stack listener is AF_INET6, v4-mapped), so only that family is looked in."""
    return (family, local), (family, ipaddress.IPv4Address(0) if family == 4 else _ANY6)


def _v4(addr: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet or socket address stands for, if any."""
    if isinstance(addr, ipaddress.IPv4Address):
        return addr
    return addr.ipv4_mapped


def _rcv_addr_for_v4(s: Sock) -> ipaddress.IPv4Address | None:
    """The IPv4 address a socket receives IPv4 on (sk_rcv_saddr), None if none: an
    AF_INET6 socket takes IPv4 only without IPV6_V6ONLY, on :: (as 0.0.0.0) or a
    v4-mapped address (ipv6_addr_set_v4mapped in inet6_bind)."""
    if s.family == 4:
        return s.local if isinstance(s.local, ipaddress.IPv4Address) else _v4(s.local)
    if s.v6only:
        return None
    if s.local == _ANY6:
        return ipaddress.IPv4Address(0)
    return _v4(s.local)


def _local_for(s: Sock, v4: bool) -> Address | None:
    """The address a socket is matched on for a packet of this family."""
    if v4:
        return _rcv_addr_for_v4(s)
    return s.local if s.family == 6 and _v4(s.local) is None else None


def _dev_ok(s: Sock, p: Packet) -> bool:
    return not s.bound_dev or not p.dev or s.bound_dev == p.dev


def _show(s: Sock) -> str:
    where = f"[{s.local}]:{s.port}" if s.family == 6 else f"{s.local}:{s.port}"
    if s.remote is not None and s.remote_port:
        peer = f"[{s.remote}]:{s.remote_port}" if s.family == 6 else f"{s.remote}:{s.remote_port}"
        where += f" <-> {peer}"
    return f"socket {s.cookie} ({'tcp' if s.protocol == IPPROTO_TCP else 'udp'}{s.family} {where})"


def lookup(p: Packet, socks: Sequence[Sock], other_sk_lookup: bool = False,
           dev_names: Mapping[int, str] | None = None) -> Verdict:  # fmt: skip
    """The socket(s) the kernel hands packet `p` to, among `socks` (one namespace).
    `other_sk_lookup`: a BPF sk_lookup program (not sockwatch's observer) is attached in
    the namespace and may steer the packet elsewhere; the verdict says so. With the
    ingress device unknown (p.dev 0) and sockets bound to devices among the candidates,
    one lookup per device (`dev_names`: ifindex -> name, for the steps)."""
    devs = sorted({s.bound_dev for s in socks if s.bound_dev and s.protocol == p.protocol and s.port == p.dport})
    if p.dev or not devs:
        return _lookup(p, socks, other_sk_lookup)
    cases = {d: _lookup(replace(p, dev=d), socks, other_sk_lookup) for d in [*devs, OTHER_DEV]}
    first = cases[devs[0]]
    names = dev_names or {}

    def dev(d: int) -> str:
        return "any other device" if d == OTHER_DEV else f"{names.get(d, f'ifindex {d}')}"

    if all(v.sockets == first.sockets and v.reason == first.reason for v in cases.values()):
        first.steps.append(f"the same on every device ({', '.join(dev(d) for d in cases)})")
        return first
    steps = [f"sockets on this port are bound to devices (SO_BINDTODEVICE): {', '.join(dev(d) for d in devs)}; "
             "which one takes the packet depends on the device it arrives on (--dev names it):"]  # fmt: skip
    for d, v in cases.items():
        took = ", ".join(_show(s) for s in v.sockets) if v.sockets else f"none (the sender gets {v.answer})"
        steps.append(f"arriving on {dev(d)}: {'one of ' if len(v.sockets) > 1 else ''}{took}")
    union = list({s.cookie: s for v in cases.values() for s in v.sockets}.values())
    return Verdict(union, "by-device", steps, by_device=cases)


def _lookup(p: Packet, socks: Sequence[Sock], other_sk_lookup: bool) -> Verdict:
    v4 = _v4(p.dst) is not None
    dst: Address = _v4(p.dst) if v4 else p.dst  # type: ignore[assignment]
    src = p.src if p.src is None or not v4 else (_v4(p.src) or p.src)
    mine = [s for s in socks if s.protocol == p.protocol and s.port == p.dport]
    steps: list[str] = []
    steer = "a BPF sk_lookup program in this namespace may pick another socket here (it runs after "
    if p.protocol == IPPROTO_TCP:
        return _tcp(p, mine, v4, dst, src, steps, other_sk_lookup, steer)
    if p.protocol == IPPROTO_UDP:
        return _udp(p, mine, v4, dst, src, steps, other_sk_lookup, steer)
    raise ValueError(f"protocol {p.protocol} is not TCP or UDP")


def _same_peer(s: Sock, src: Address | None, sport: int, v4: bool) -> bool:
    if s.remote is None or src is None:
        return False
    remote = _v4(s.remote) if v4 else s.remote
    return remote == src and s.remote_port == sport


def _tcp(p: Packet, mine: list[Sock], v4: bool, dst: Address, src: Address | None, steps: list[str],
         other: bool, steer: str) -> Verdict:  # fmt: skip
    # 1. __inet_lookup_established (inet_hashtables.c): the 4-tuple, TIME-WAIT included
    time_wait = None
    for s in mine:
        if s.state in (TcpState.LISTEN, TcpState.CLOSE) or not s.remote_port:
            continue
        if _local_for(s, v4) == dst and _same_peer(s, src, p.sport, v4) and _dev_ok(s, p):
            if s.state != TcpState.TIME_WAIT:
                steps.append(f"the established table has this 4-tuple: {_show(s)}")
                return Verdict([s], "established", steps)
            # tcp_v4_rcv, TCP_TW_SYN: a SYN the TIME-WAIT socket accepts (a later sequence
            # number or timestamp) ends it and is looked up again among the listeners
            time_wait = s
            steps.append(f"the 4-tuple is in TIME-WAIT ({_show(s)}): a new SYN that it accepts goes on to the "
                         "listeners (tcp_v4_rcv, TCP_TW_SYN); any other segment stays with it")  # fmt: skip
            break
    if time_wait is None:
        steps.append("no connection has this 4-tuple (__inet_lookup_established)" if src is not None else
                     "no source given: established connections are not considered")  # fmt: skip
    if other:
        steps.append(steer + "the established table, before the listeners)")
    listeners = [s for s in mine if s.state == TcpState.LISTEN]
    # 3. inet_lhash2_lookup: the destination address's slot, then the wildcard's
    for slot, want in (("bound to the destination address", dst),
                       ("bound to the wildcard", ipaddress.IPv4Address(0) if v4 else _ANY6)):  # fmt: skip
        best = _best(listeners, lambda s, w=want: _tcp_score(s, p, v4, w))
        if best:
            steps.append(f"listeners {slot}: {', '.join(map(_show, best))}")
            return _pick(best, "listener", steps)
        steps.append(f"no listener {slot}")
    if time_wait is not None:
        steps.append("no listener: the TIME-WAIT socket answers (an ACK, or RST)")
        return Verdict([time_wait], "time-wait", steps)
    steps.append("nothing takes it: the kernel answers with RST")
    return Verdict([], "nothing", steps, answer="RST")


def _tcp_score(s: Sock, p: Packet, v4: bool, want: Address) -> int:
    """compute_score (inet_hashtables.c; inet6_hashtables.c for IPv6)."""
    if _local_for(s, v4) != want or not _dev_ok(s, p):
        return -1
    score = 2 if s.bound_dev else 1
    if v4 and s.family == 4:
        score += 1  # AF_INET over a dual-stack AF_INET6 socket
    return score


def _udp(p: Packet, mine: list[Sock], v4: bool, dst: Address, src: Address | None, steps: list[str],
         other: bool, steer: str) -> Verdict:  # fmt: skip
    def score(s: Sock, want: Address) -> int:
        """compute_score (udp.c; udp6_compute_score for IPv6)."""
        if _local_for(s, v4) != want:
            return -1
        sc = 2 if (v4 and s.family == 4) else 1
        if s.remote is not None and s.remote_port:
            if not _same_peer(s, src, p.sport, v4):
                return -1
            sc += 8  # +4 for the remote address, +4 for the remote port
        if s.bound_dev:
            if not _dev_ok(s, p):
                return -1
            sc += 4
        return sc

    best = _best(mine, lambda s: score(s, dst))
    connected = [s for s in mine if s.remote_port and score(s, dst) >= 0]
    if len(connected) == 1:
        steps.append(f"a connected socket matches the source too: {_show(connected[0])}")
        return Verdict(connected, "connected", steps)
    if connected:
        # Linux 6.13+ looks connected sockets up by a 4-tuple hash first (udp4_lib_lookup4):
        # the last connected wins; before, compute_score preferred AF_INET, then chain order
        steps.append(f"{len(connected)} connected sockets share this 4-tuple (SO_REUSEPORT): "
                     f"{', '.join(map(_show, connected))}; the last connected takes it since Linux 6.13, "
                     "an AF_INET one before")  # fmt: skip
        return Verdict(connected, "connected", steps)
    steps.append("no connected socket matches this source and destination")
    if other:
        steps.append(steer + "connected sockets, before unconnected ones)")
    if best:
        steps.append(f"sockets bound to the destination address: {', '.join(map(_show, best))}")
        return _pick(best, "bound", steps)
    steps.append("no socket bound to the destination address")
    best = _best(mine, lambda s: score(s, ipaddress.IPv4Address(0) if v4 else _ANY6))
    if best:
        steps.append(f"sockets bound to the wildcard: {', '.join(map(_show, best))}")
        return _pick(best, "bound", steps)
    steps.append("no socket bound to the wildcard either: the kernel answers with ICMP port unreachable")
    return Verdict([], "nothing", steps, answer="ICMP port unreachable")


def _best(socks: list[Sock], score: object) -> list[Sock]:
    scored = [(score(s), s) for s in socks]  # type: ignore[operator]
    top = max((sc for sc, _ in scored), default=-1)
    return [s for sc, s in scored if sc == top] if top >= 0 else []


def _group_key(s: Sock) -> tuple:
    """Which SO_REUSEPORT group a socket joined: inet_reuseport_add_sock and
    udp_reuseport_add_sock put sockets together only with the same family, IPV6_V6ONLY,
    bound device, address and uid."""
    return (s.family, s.v6only, s.bound_dev, s.local, s.uid)


def _pick(best: list[Sock], reason: str, steps: list[str]) -> Verdict:
    if len(best) == 1:
        return Verdict(best, reason, steps)
    groups = {_group_key(s) for s in best}
    if all(s.reuseport for s in best) and len(groups) == 1:
        steps.append(f"an SO_REUSEPORT group of {len(best)}: the kernel picks one member per flow "
                     "(a hash of the 4-tuple, or the group's BPF program)")  # fmt: skip
        return Verdict(best, reason, steps, reuseport=True)
    what = "SO_REUSEPORT groups or sockets" if any(s.reuseport for s in best) else "sockets (SO_REUSEADDR)"
    steps.append(f"{len(best)} {what} score the same here: the first in the kernel's hash chain takes every "
                 "flow (the one bound last; for IPv6 reuseport sockets the first bound)")  # fmt: skip
    return Verdict(best, reason, steps)


def from_kernel(diags: Sequence[DiagSock], reuseport: Mapping[int, bool] | None = None) -> list[Sock]:
    """Sockets as sock_diag reports them (DiagSock: v6only and the bound device
    included) for lookup. sock_diag does not say SO_REUSEPORT: `reuseport` (cookie ->
    the option, read from the socket itself) says it where known; elsewhere TCP
    listeners sharing an address and port are marked as a group (listen() refuses the
    second otherwise), and UDP sockets sharing one are left unmarked (a tie)."""
    known = reuseport or {}
    socks = []
    for d in diags:
        connected = d.remote_port != 0
        socks.append(Sock(d.cookie, d.protocol, d.family, d.state, d.local_address, d.local_port,
                          d.remote_address if connected else None, d.remote_port,
                          v6only=d.v6only, bound_dev=d.bound_dev, reuseport=known.get(d.cookie, False),
                          uid=d.uid))  # fmt: skip
    listen_keys: dict[tuple, int] = {}
    for s in socks:
        if s.protocol == IPPROTO_TCP and s.state == TcpState.LISTEN:
            k = (s.family, s.local, s.port, s.bound_dev)
            listen_keys[k] = listen_keys.get(k, 0) + 1
    return [
        replace(s, reuseport=True)
        if s.cookie not in known and s.protocol == IPPROTO_TCP and s.state == TcpState.LISTEN
        and listen_keys[(s.family, s.local, s.port, s.bound_dev)] > 1
        else s
        for s in socks
    ]  # fmt: skip
