"""Row filters from command-line text: parsed once, clear errors, pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sockwatch.model import PROTO_NUMBERS, STATE_NUMBERS, SockRow

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class FilterError(ValueError):
    """A filter the user typed cannot be understood; the message says why."""


@dataclass(frozen=True)
class Filters:
    protocols: frozenset[int] = frozenset()
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges, local or remote
    networks: tuple[Net, ...] = ()  # local or remote address inside one of them
    states: frozenset[int] = frozenset()
    pids: frozenset[int] = frozenset()
    netns: frozenset[int] = frozenset()
    extra: tuple[Callable[[SockRow], bool], ...] = field(default=(), compare=False)

    def to_wire(self) -> dict:
        """JSON-safe form, sent to the agent (which parses it again: one code path)."""
        inv_state = {v: k for k, v in STATE_NUMBERS.items()}
        inv_proto = {v: k for k, v in PROTO_NUMBERS.items()}
        return {
            "protocol": sorted(inv_proto[p] for p in self.protocols),
            "port": [f"{a}-{b}" for a, b in self.ports],
            "addr": [str(n) for n in self.networks],
            "state": sorted(inv_state[s] for s in self.states),
            "pid": sorted(self.pids),
            "netns": sorted(self.netns),
        }

    def match(self, row: SockRow) -> bool:
        if self.protocols and row.protocol not in self.protocols:
            return False
        if self.states and row.state not in self.states:
            return False
        if self.pids and row.pid not in self.pids:
            return False
        if self.netns and row.netns not in self.netns:
            return False
        if self.ports and not any(
            lo <= p <= hi for lo, hi in self.ports for p in (row.local_port, row.remote_port) if p
        ):
            return False
        if self.networks:
            addrs = [row.local_address]
            if row.remote_address is not None:
                addrs.append(row.remote_address)
            if not any(_in(a, n) for a in addrs for n in self.networks):
                return False
        return True

    @property
    def empty(self) -> bool:
        return not (self.protocols or self.ports or self.networks or self.states or self.pids or self.netns)


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, net: Net) -> bool:
    if addr.version != net.version:
        # an IPv4 filter also matches v4-mapped addresses of dual-stack sockets
        mapped = getattr(addr, "ipv4_mapped", None)
        return mapped is not None and net.version == 4 and mapped in net
    return addr in net


def parse_port(text: str) -> tuple[int, int]:
    """'53' or '8000-8100' -> inclusive range; ports are 0..65535."""
    lo_s, sep, hi_s = text.strip().partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise FilterError(f"port {text!r} is not a number or a range like 8000-8100") from None
    for p in (lo, hi):
        if not 0 <= p <= 65535:
            raise FilterError(f"port {p} is out of range: ports are 0 to 65535")
    if lo > hi:
        raise FilterError(f"port range {text!r} is backwards: write {hi}-{lo}")
    return lo, hi


def parse_network(text: str) -> Net:
    try:
        return ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        raise FilterError(f"address {text!r} is not an IP address or CIDR (e.g. 10.0.0.0/8, ::1)") from None


def parse_state(text: str) -> int:
    name = text.strip().upper().replace("_", "-")
    aliases = {"ESTABLISHED": "ESTAB", "CLOSE": "UNCONN", "UNCONNECTED": "UNCONN", "TIMEWAIT": "TIME-WAIT"}
    name = aliases.get(name, name)
    if name not in STATE_NUMBERS:
        known = ", ".join(sorted(STATE_NUMBERS))
        raise FilterError(f"state {text!r} is not one of: {known}")
    return STATE_NUMBERS[name]


def parse_protocol(text: str) -> int:
    name = text.strip().lower()
    if name not in PROTO_NUMBERS:
        raise FilterError(f"protocol {text!r} is not tcp or udp")
    return PROTO_NUMBERS[name]


def _positive(text: str | int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise FilterError(f"{what} {text!r} is not a number") from None
    if n <= 0:
        raise FilterError(f"{what} {text!r} must be a positive number")
    return n


def build(
    protocol: Iterable[str] = (),
    port: Iterable[str] = (),
    addr: Iterable[str] = (),
    state: Iterable[str] = (),
    pid: Iterable[str | int] = (),
    netns: Iterable[str | int] = (),
) -> Filters:
    """Parse every filter or raise FilterError naming the first bad one."""
    return Filters(
        protocols=frozenset(parse_protocol(p) for p in protocol),
        ports=tuple(parse_port(p) for p in port),
        networks=tuple(parse_network(a) for a in addr),
        states=frozenset(parse_state(s) for s in state),
        pids=frozenset(_positive(p, "pid") for p in pid),
        netns=frozenset(_positive(n, "netns") for n in netns),
    )


def from_wire(d: dict) -> Filters:
    return build(
        protocol=d.get("protocol", ()),
        port=d.get("port", ()),
        addr=d.get("addr", ()),
        state=d.get("state", ()),
        pid=d.get("pid", ()),
        netns=d.get("netns", ()),
    )
