"""Would a bind() succeed now, and if not, which sockets stand in its way and why: the
kernel's rules as pure functions over a namespace's sockets (no I/O, no root), beside
demux.py's lookup rules. Line references are to Linux 6.x.

The checks bind() makes, in order (net/ipv4/af_inet.c __inet_bind, net/ipv6/af_inet6.c
__inet6_bind):

1. The address: an IPv4-mapped address on an IPV6_V6ONLY socket is EINVAL; an address
   no interface of the namespace has is EADDRNOTAVAIL (inet_addr_valid_or_nonlocal,
   unless ip_nonlocal_bind, IP_FREEBIND or IP_TRANSPARENT: not modelled).
2. The port: below net.ipv4.ip_unprivileged_port_start it needs CAP_NET_BIND_SERVICE,
   else EACCES (inet_port_requires_bind_service). Port 0 asks the kernel to choose.
3. The port's owners (EADDRINUSE):
   - TCP, inet_csk_get_port -> inet_csk_bind_conflict -> inet_bind_conflict: every TCP
     socket holding the port (listeners, connections, TIME-WAIT, a port connect() bound
     implicitly, sockets bound and not listening) whose address overlaps and whose
     device overlaps conflicts, unless
       both set SO_REUSEADDR and the other is not listening, or
       both set SO_REUSEPORT and the other is in TIME-WAIT or has the same owner uid.
   - UDP, udp_lib_get_port -> udp_lib_lport_inuse: every UDP socket on the port whose
     address and device overlap conflicts, unless both set SO_REUSEADDR, or both set
     SO_REUSEPORT with the same owner uid.
   Addresses overlap (inet_rcv_saddr_equal, ipv6_rcv_saddr_equal) when equal, when either
   is the wildcard of a family that takes the other's packets (0.0.0.0 and a dual-stack
   ::, but not an IPV6_V6ONLY ::), when both are :: (IPV6_V6ONLY or not), and v4-mapped
   addresses compare as IPv4. bind() to a plain IPv6 address sets IPV6_V6ONLY (__inet6_bind),
   so such a socket competes with no IPv4 one; a socket bound to :: that connect() gave a
   plain IPv6 address keeps LOOPBACK4_IPV6 (127.0.0.6) as its IPv4 address, which a
   wildcard IPv4 bind, or one to 127.0.0.6, meets. A TCP bind to a specific address is
   checked only against its own address's bind bucket and the wildcard ones
   (inet_use_bhash2_on_bind, 6.1 on). Devices overlap when either socket is bound to
   none, or both to the same.

A TIME-WAIT socket keeps the SO_REUSEADDR and SO_REUSEPORT of the socket it was (its
tw_reuse, tw_reuseport) and no system call reads them back: the command reads them with
a BPF iterator (kernel/sockflags.py); flags still not known (None) make the verdict name
both outcomes. So does TCP's SO_REUSEPORT fast path (sk_reuseport_match), which skips
the check when the port's bind bucket last took an SO_REUSEPORT socket of the same uid
and address, even one closed since: a history no interface shows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, TcpState

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK4_IPV6 = ipaddress.IPv4Address("127.0.0.6")
_ANY4 = ipaddress.IPv4Address(0)
_ANY6 = ipaddress.IPv6Address(0)


@dataclass(frozen=True)
class Holder:
    """A socket holding a port, as read from the kernel (reuse flags from the socket
    itself: None where they cannot be read, as for a TIME-WAIT socket)."""

    cookie: int
    protocol: int
    family: int  # 4 or 6: the socket's own
    state: int  # TcpState numbering; UDP: 7 (unconnected) or 1 (connected)
    local: Address
    port: int
    v6only: bool = False
    bound_dev: int = 0  # SO_BINDTODEVICE ifindex; 0: any
    reuseaddr: bool | None = False
    reuseport: bool | None = False
    uid: int = 0


@dataclass(frozen=True)
class Bind:
    """The bind() asked about: its socket's options and its owner."""

    protocol: int
    address: Address  # its family is the socket's: an IPv4-mapped address is an AF_INET6 socket's
    port: int
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False  # AF_INET6 only
    bound_dev: int = 0  # SO_BINDTODEVICE before bind(); 0: none
    uid: int = 0  # the owner's effective uid (sk_uid)
    can_bind_service: bool = True  # CAP_NET_BIND_SERVICE in the namespace's user namespace

    @property
    def family(self) -> int:
        return 4 if isinstance(self.address, ipaddress.IPv4Address) else 6


@dataclass(frozen=True)
class Conflict:
    holder: Holder
    why: str
    certain: bool = True  # False: it hangs on the holder's reuse flags, which cannot be read


@dataclass
class BindVerdict:
    errno: str | None  # None: bind() succeeds; else EADDRINUSE, EACCES, EADDRNOTAVAIL, EINVAL
    steps: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # true either way: the port range, reserved ports
    # where the outcome hangs on flags no interface reads back (a TIME-WAIT socket's):
    # the errno with the worst case, and this with the best (None: succeeds)
    otherwise: str | None = "same"

    @property
    def certain(self) -> bool:
        return self.otherwise == "same"


@dataclass(frozen=True)
class Context:
    """What the namespace says besides its sockets."""

    local_addresses: frozenset[Network] | None = None  # None: not known (the address check is skipped)
    unprivileged_port_start: int = 1024
    ephemeral: tuple[int, int] = (32768, 60999)
    reserved: frozenset[int] = frozenset()
    v6: frozenset[tuple[ipaddress.IPv6Address, int, int]] | None = None  # (address, ifindex, scope); None: not known


def _v4_of(h_family: int, local: Address, v6only: bool) -> Address | None:
    """sk_rcv_saddr: the IPv4 address a socket is bound to for IPv4's comparisons, None if
    it takes no IPv4 (IPV6_V6ONLY)."""
    if h_family == 4:
        return local
    assert isinstance(local, ipaddress.IPv6Address)
    if local.ipv4_mapped is not None:
        return local.ipv4_mapped
    if local == _ANY6:
        return _ANY4
    # bind() to a plain IPv6 address sets IPV6_V6ONLY; a socket bound to :: that connect()
    # gave a plain IPv6 address keeps LOOPBACK4_IPV6 as its IPv4 one (ip6_datagram_connect,
    # tcp_v6_connect), which a wildcard IPv4 bind, or one to 127.0.0.6, meets
    return LOOPBACK4_IPV6


def _mapped(family: int, local: Address) -> bool:
    """IPV6_ADDR_MAPPED as ipv6_addr_type sees it (an AF_INET socket's address counts as one)."""
    return family == 4 or (isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None)


def overlap(fam1: int, addr1: Address, v6only1: bool, fam2: int, addr2: Address, v6only2: bool) -> bool:
    """inet_rcv_saddr_equal(sk1, sk2, match_wildcard=true): whether two sockets' bound
    addresses compete for the same packets."""
    if fam1 == 6:  # ipv6_rcv_saddr_equal
        t1_mapped = _mapped(6, addr1)
        t2_mapped = _mapped(fam2, addr2)
        if t1_mapped and t2_mapped:
            a, b = _v4_of(6, addr1, v6only1), _v4_of(fam2, addr2, v6only2)
            if v6only2:
                return False
            return a == b or _ANY4 in (a, b)
        any1, any2 = addr1 == _ANY6, fam2 == 6 and addr2 == _ANY6
        if any1 and any2:
            return True
        if any2 and not (v6only2 and t1_mapped):
            return True
        if any1 and not (v6only1 and t2_mapped):
            return True
        return fam2 == 6 and addr1 == addr2
    # ipv4_rcv_saddr_equal(sk1's, sk2's, ipv6_only_sock(sk2), true, true)
    if v6only2:
        return False
    b = _v4_of(fam2, addr2, v6only2)
    return addr1 == b or _ANY4 in (addr1, b)


def _bucket(family: int, addr: Address) -> tuple[str, Address]:
    """A socket's bhash2 bucket address (inet_bind2_bucket_match_addr): IPv4 and
    v4-mapped IPv6 share buckets by their IPv4 address; other IPv6 by their own."""
    if family == 4:
        return "4", addr
    assert isinstance(addr, ipaddress.IPv6Address)
    return ("4", addr.ipv4_mapped) if addr.ipv4_mapped is not None else ("6", addr)


def _specific(b: Bind) -> bool:
    """inet_use_bhash2_on_bind: a TCP bind to a specific address is checked against its
    own address's bucket and the wildcard buckets only (6.1 and later)."""
    return _bucket(b.family, b.address)[1] not in (_ANY4, _ANY6)


def _bhash2_competes(b: Bind, h: Holder) -> bool:
    """Whether inet_csk_get_port compares a specific TCP bind with `h`: `h` in the bind's
    own bucket (inet_bhash2_conflict), or in a wildcard bucket that takes the bind's
    family (inet_bhash2_addr_any_conflict: a :: bucket always, 0.0.0.0 unless the bind
    is plain IPv6); an IPV6_V6ONLY socket never competes with an IPv4 bind."""
    if b.family == 4 and h.v6only:
        return False
    mine, theirs = _bucket(b.family, b.address), _bucket(h.family, h.local)
    if mine == theirs:
        return True
    if theirs == ("6", _ANY6):
        return True
    return theirs == ("4", _ANY4) and mine[0] == "4"


def _fmt(h: Holder) -> str:
    proto = "tcp" if h.protocol == IPPROTO_TCP else "udp"
    where = f"[{h.local}]:{h.port}" if h.family == 6 else f"{h.local}:{h.port}"
    names: dict[int, str] = {TcpState.LISTEN: "LISTEN", TcpState.TIME_WAIT: "TIME-WAIT"}
    state = names.get(h.state)
    if h.protocol == IPPROTO_UDP:
        state = "UNCONN" if h.state == TcpState.CLOSE else "ESTAB"
    return f"socket {h.cookie} ({proto}{h.family} {where} {state or _state_name(h.state)})"


def _state_name(state: int) -> str:
    from sockwatch.model import STATE_NAMES

    return STATE_NAMES.get(state, str(state))


def _tcp_conflict(b: Bind, h: Holder) -> tuple[bool | None, str]:
    """inet_bind_conflict(sk, sk2, uid, relax=true, reuseport_cb_ok=true, reuseport_ok=true)
    for sockets whose addresses and devices overlap: (conflicts, why); None: it hangs
    on the holder's flags, which are not known."""
    listening = h.state == TcpState.LISTEN
    tw = h.state == TcpState.TIME_WAIT
    if b.reuseaddr and not listening:
        if h.reuseaddr:
            return False, "both set SO_REUSEADDR and it is not listening"
        reuse_ok = None if h.reuseaddr is None else False
    else:
        reuse_ok = False
    port_ok: bool | None = False
    if b.reuseport:
        if h.reuseport is None:
            port_ok = None if (tw or h.uid == b.uid) else False
        elif h.reuseport and (tw or h.uid == b.uid):
            port_ok = True
    if port_ok:
        return False, "both set SO_REUSEPORT" + (" (it is in TIME-WAIT)" if tw else ", with the same owner uid")
    if reuse_ok is None or port_ok is None:
        return None, _tcp_why(b, h, listening)
    return True, _tcp_why(b, h, listening)


def _tcp_why(b: Bind, h: Holder, listening: bool) -> str:
    if b.reuseaddr and listening:
        why = "SO_REUSEADDR does not share a port with a listener"
    elif b.reuseaddr:
        why = "it did not set SO_REUSEADDR" if h.reuseaddr is False else "SO_REUSEADDR is shared only if it set it too"
    else:
        why = "the port is held" + (" (SO_REUSEADDR on both would share it)" if not listening else "")
    if b.reuseport:
        if h.reuseport is False:
            why += "; it did not set SO_REUSEPORT"
        elif h.reuseport and h.state != TcpState.TIME_WAIT and h.uid != b.uid:
            why += f"; SO_REUSEPORT needs the same owner uid (it is {h.uid}'s)"
    if h.state == TcpState.TIME_WAIT:
        why = "in TIME-WAIT: " + why
    return why


def _udp_conflict(b: Bind, h: Holder) -> tuple[bool | None, str]:
    """udp_lib_lport_inuse's test for sockets whose addresses and devices overlap. Unlike
    TCP's, its walk of the port's hash chain stops at the first socket that competes (not
    both SO_REUSEADDR): that one alone decides (see check)."""
    if b.reuseaddr and h.reuseaddr:
        return False, "both set SO_REUSEADDR"
    if b.reuseport and h.reuseport and h.uid == b.uid:
        return False, "both set SO_REUSEPORT, with the same owner uid"
    unknown = (b.reuseaddr and h.reuseaddr is None) or (b.reuseport and h.reuseport is None and h.uid == b.uid)
    if b.reuseport and h.reuseport and h.uid != b.uid:
        why = f"SO_REUSEPORT needs the same owner uid (it is {h.uid}'s)"
    elif b.reuseaddr or b.reuseport:
        parts = []
        if b.reuseaddr:
            parts.append("it did not set SO_REUSEADDR")
        if b.reuseport:
            parts.append("it did not set SO_REUSEPORT")
        why = " and ".join(parts)
    else:
        why = "the port is held (SO_REUSEADDR, or SO_REUSEPORT with the same uid, on both would share it)"
    return (None if unknown else True), why


def check(b: Bind, holders: Sequence[Holder], ctx: Context = Context()) -> BindVerdict:
    """The outcome of bind(b) with `holders` the namespace's sockets of b's protocol."""
    v = BindVerdict(None)
    before = _before_the_port(b, ctx)
    if before is not None:
        v.errno, why = before
        v.steps.append(why)
        return v
    if not b.port:
        v.steps.append("port 0: the kernel chooses a free port in the ephemeral range (inet_csk_find_open_port / "
                       "udp_lib_get_port)")  # fmt: skip
        return v
    lo, hi = ctx.ephemeral
    if lo <= b.port <= hi:
        v.notes.append(f"port {b.port} is in the ephemeral range ({lo}-{hi}): connect() may take it first")
    if b.port in ctx.reserved:
        v.notes.append(f"port {b.port} is in ip_local_reserved_ports: the kernel never picks it, an explicit bind may")
    udp = b.protocol == IPPROTO_UDP
    rule = _udp_conflict if udp else _tcp_conflict
    worst, best = False, False
    decided: list[tuple[Holder, bool | None]] = []  # UDP: the competing sockets, in the kernel's chain order
    for h in holders:
        if h.protocol != b.protocol or h.port != b.port:
            continue
        if b.bound_dev and h.bound_dev and b.bound_dev != h.bound_dev:
            v.steps.append(f"{_fmt(h)}: bound to another device, no conflict")
            continue
        if not (_bhash2_competes(b, h) if b.protocol == IPPROTO_TCP and _specific(b) else
                overlap(b.family, b.address, b.v6only, h.family, h.local, h.v6only)):  # fmt: skip
            continue
        hit, why = rule(b, h)
        if udp and not (b.reuseaddr and h.reuseaddr):
            decided.append((h, hit))
        if hit is False:
            v.steps.append(f"{_fmt(h)}: shares the port, {why}")
            continue
        v.conflicts.append(Conflict(h, why, certain=hit is True))
        worst = True
        best = best or hit is True
    if udp and decided and len({hit for _h, hit in decided}) > 1:
        # the first competing socket on the port's chain decides (udp_lib_lport_inuse returns at
        # it). sock_diag gives the chain's order within a family; across families, what
        # udp_lib_get_port's insertion tells: an IPv6 SO_REUSEPORT socket goes to the tail,
        # every other to the head, so those come first, in an order only their binds' times tell
        head = [d for d in decided if not (d[0].family == 6 and d[0].reuseport)]
        tail = [d for d in decided if d[0].family == 6 and d[0].reuseport]
        first: tuple[Holder, bool | None] | None = None
        if not head:
            first = tail[0]
        elif len({h.family for h, _hit in head}) == 1 or len({hit for _h, hit in head}) == 1:
            first = head[0]
        if first is not None:
            holder, hit = first
            worst, best = hit is not False, hit is True
            # in the way: none if the first shares the port; else every one that would not (the
            # first, then the rest: closing the first alone hands the decision to the next)
            v.conflicts = [] if hit is False else sorted(v.conflicts, key=lambda c: c.holder is not holder)
            v.steps.append(f"{_fmt(holder)} comes first on the port's hash chain: the kernel decides at it")
        else:
            best = False
            v.notes.append("the first competing socket on the port's hash chain decides, and the chain's order "
                           "across IPv4 and IPv6 sockets bound at different times cannot be read: the outcome "
                           "may differ")  # fmt: skip
    if not udp and worst and b.reuseport:
        # sk_reuseport_match: the port's bucket remembers the SO_REUSEPORT socket it last took
        # (its uid and address), even once that socket is closed, and a bind matching it
        # succeeds without this check. No interface shows what the bucket remembers.
        best = False
        v.notes.append("the kernel skips this check when the port's bind bucket last took an SO_REUSEPORT socket "
                       "of this uid and address, even one closed since (sk_reuseport_match's fast path), which "
                       "no interface shows: then the bind succeeds")  # fmt: skip
    function = "udp_lib_lport_inuse" if udp else "inet_csk_bind_conflict"
    if worst:
        v.errno = "EADDRINUSE"
        v.steps += [f"{_fmt(c.holder)} conflicts: {c.why}" + ("" if c.certain else " (its flags cannot be read: "
                    "a TIME-WAIT socket keeps those of the socket it was)") for c in v.conflicts]  # fmt: skip
        v.steps.append(f"bind() fails with EADDRINUSE ({function})")
        if not best:
            v.otherwise = None  # every conflict hangs on flags not known: it may also succeed
    else:
        v.steps.append(f"no socket holding port {b.port} conflicts ({function})")
    return v


EACCES_WHY = (
    "port {port} is below net.ipv4.ip_unprivileged_port_start ({start}): it needs "
    "CAP_NET_BIND_SERVICE (inet_port_requires_bind_service)"
)
NOT_LOCAL_WHY = (
    "no interface in the namespace has {addr} (inet_addr_valid_or_nonlocal; IP_FREEBIND or "
    "net.ipv4.ip_nonlocal_bind would allow it)"
)


def _before_the_port(b: Bind, ctx: Context) -> tuple[str, str] | None:
    """The checks bind() makes before it looks at the port's owners, in each family's
    order: (errno, why), or None. IPv4 (__inet_bind) checks the address, then the port's
    privilege; IPv6 (__inet6_bind) the privilege first, then the address: a v4-mapped one
    (never on an IPV6_V6ONLY socket) as IPv4, a link-local one only with a device, and
    with a device bound, a host- or link-scoped address only if that device has it."""
    privileged = bool(b.port) and b.port < ctx.unprivileged_port_start and not b.can_bind_service
    eacces = ("EACCES", EACCES_WHY.format(port=b.port, start=ctx.unprivileged_port_start))
    not_local = ("EADDRNOTAVAIL", NOT_LOCAL_WHY.format(addr=b.address))
    if b.family == 4:
        if ctx.local_addresses is not None and not _local(b.address, ctx.local_addresses):
            return not_local
        return eacces if privileged else None
    a = b.address
    assert isinstance(a, ipaddress.IPv6Address)
    if a.is_multicast and b.protocol == IPPROTO_TCP:
        return "EINVAL", f"{a} is multicast: a TCP socket cannot bind it (__inet6_bind)"
    if privileged:
        return eacces
    if a.ipv4_mapped is not None:
        if b.v6only:
            return "EINVAL", f"{a} is IPv4-mapped, which an IPV6_V6ONLY socket cannot bind (__inet6_bind)"
        if ctx.local_addresses is not None and not _local(a, ctx.local_addresses):
            return not_local
        return None
    if a == _ANY6 or a.is_multicast:
        return None
    if a.is_link_local and not b.bound_dev:
        return "EINVAL", f"{a} is link-local: binding it needs a device (SO_BINDTODEVICE or a scope id)"
    if ctx.v6 is not None:
        on = [(dev, scope) for addr, dev, scope in ctx.v6 if addr == a]
        if not on:
            return not_local
        if b.bound_dev and not any(dev == b.bound_dev or not scope & (SCOPE_HOST | SCOPE_LINK) for dev, scope in on):
            return "EADDRNOTAVAIL", (f"{a} is not on the socket's device, and its scope (host or link) keeps it "
                                     "there (ipv6_chk_addr_and_flags)")  # fmt: skip
    elif ctx.local_addresses is not None and not _local(a, ctx.local_addresses):
        return not_local
    return None


SCOPE_HOST, SCOPE_LINK = 0x10, 0x20  # IFA_HOST, IFA_LINK, as /proc/net/if_inet6 shows a scope


def v6_addresses(if_inet6: str) -> frozenset[tuple[ipaddress.IPv6Address, int, int]]:
    """(address, ifindex, scope) for each line of /proc/net/if_inet6."""
    out = set()
    for line in if_inet6.splitlines():
        parts = line.split()
        if len(parts) >= 6 and len(parts[0]) == 32:
            try:
                out.add((ipaddress.IPv6Address(int(parts[0], 16)), int(parts[1], 16), int(parts[3], 16)))
            except ValueError:
                continue
    return frozenset(out)


def _local(addr: Address, local: Iterable[Network]) -> bool:
    """Whether bind() finds the address in the namespace: the wildcard, multicast and
    the limited broadcast always; an IPv4-mapped one as its IPv4 address."""
    a: Address = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped else addr
    if a in (_ANY4, _ANY6) or a.is_multicast or a == ipaddress.IPv4Address("255.255.255.255"):
        return True
    return any(a.version == n.version and a in n for n in local)


def local_addresses(fib_trie: str, if_inet6: str) -> frozenset[Network]:
    """What bind() takes as local in a namespace: the IPv4 routes of type LOCAL or
    BROADCAST in /proc/net/fib_trie (127.0.0.0/8 whole, as inet_addr_type sees it), and
    each address of /proc/net/if_inet6."""
    out: set[Network] = set()
    last = ""
    for line in fib_trie.splitlines():
        t = line.strip()
        if t.startswith(("|--", "+--")):
            last = t[3:].split()[0]
        elif t.startswith("/") and (t.endswith(" LOCAL") or t.endswith(" BROADCAST")) and last:
            try:
                out.add(ipaddress.IPv4Network(f"{last}/{t.split()[0][1:]}", strict=False))
            except ValueError:
                continue
    for line in if_inet6.splitlines():
        parts = line.split()
        if len(parts) >= 6 and len(parts[0]) == 32:
            try:
                out.add(ipaddress.IPv6Network(int(parts[0], 16)))
            except ValueError:
                continue
    return frozenset(out)
