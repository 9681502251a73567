"""Port classes and ephemeral-port pressure, by the kernel's rules (pure; no I/O).

The textbook split (well-known 0-1023, registered 1024-49151, dynamic 49152-65535) is
not what Linux uses to pick a port: each network namespace has its own
`net.ipv4.ip_local_port_range` (default 32768-60999) minus
`net.ipv4.ip_local_reserved_ports`, for IPv4 and IPv6 alike.

What runs out, and when connect() fails with EADDRNOTAVAIL:
- TCP: a port picked for connect() may be shared by connections to different
  destinations (the 4-tuple must be unique), but not with a port bind() or listen()
  holds. So the pressure is per (namespace, local address, remote address, remote
  port): ephemeral ports used toward that destination over what the range leaves after
  reserved ports and ports listeners hold. TIME-WAIT connections still hold their
  4-tuple: they count, and are shown apart.
- UDP: an implicit bind takes a port no other UDP socket on an overlapping address
  holds, whatever the peer. So the pressure is per (namespace, local address).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sockwatch.model import fmt_addr

DEFAULT_RANGE = (32768, 60999)
REGISTERED = (1024, 49151)


class SysctlError(ValueError):
    pass


@dataclass(frozen=True)
class PortRange:
    """One namespace's ephemeral range, reserved ports, and the first port binding
    needs no privilege for (net.ipv4.ip_unprivileged_port_start)."""

    low: int
    high: int
    reserved: frozenset[int] = frozenset()
    unprivileged: int = 1024

    @functools.cached_property
    def size(self) -> int:
        return sum(1 for _ in self.usable())

    def usable(self) -> range | list[int]:
        ports = range(self.low, self.high + 1)
        return ports if not self.reserved else [p for p in ports if p not in self.reserved]

    def contains(self, port: int) -> bool:
        return self.low <= port <= self.high and port not in self.reserved


def parse_range(text: str) -> tuple[int, int]:
    """ip_local_port_range: two numbers, tab separated."""
    parts = text.split()
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise SysctlError(f"ip_local_port_range is not two numbers: {text[:40]!r}")
    low, high = int(parts[0]), int(parts[1])
    if not 1 <= low <= high <= 65535:
        raise SysctlError(f"ip_local_port_range {low} {high} is not a range of ports")
    return low, high


def parse_reserved(text: str) -> frozenset[int]:
    """ip_local_reserved_ports: comma-separated ports and ranges ("8080,9000-9002")."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        if not (lo.isascii() and lo.isdigit() and (not dash or (hi.isascii() and hi.isdigit()))):
            raise SysctlError(f"ip_local_reserved_ports has {part[:40]!r}")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b <= 65535:
            raise SysctlError(f"ip_local_reserved_ports has {part[:40]!r}")
        out.update(range(a, b + 1))
    return frozenset(out)


def parse_port_number(text: str, what: str) -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit() and len(t) <= 5 and int(t) <= 65536):
        raise SysctlError(f"{what} is not a port: {text[:40]!r}")
    return int(t)


def port_class(port: int, r: PortRange) -> str:
    """'ephemeral' (this namespace's range, not reserved), 'reserved', 'privileged'
    (below ip_unprivileged_port_start: bind() needs CAP_NET_BIND_SERVICE, else EACCES),
    'registered' (IANA's 1024-49151) or 'dynamic' (IANA's 49152-65535 outside the
    kernel's range)."""
    if r.low <= port <= r.high:
        return "reserved" if port in r.reserved else "ephemeral"
    if port < r.unprivileged:
        return "privileged"
    if port <= REGISTERED[1]:
        return "registered"
    return "dynamic"


def classes(r: PortRange) -> dict:
    """The namespace's port classes as ranges, the kernel's first."""
    return {
        "ephemeral": [r.low, r.high],
        "reserved": _ranges(sorted(r.reserved)),
        "privileged": [1, r.unprivileged - 1] if r.unprivileged > 1 else None,
        "registered": list(REGISTERED),
    }


def _ranges(ports: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in ports:
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out


def entry(key: tuple, used: int, time_wait: int, available: int) -> dict:
    """One pressure figure; `key` is (netns, protocol, local, remote, remote port)."""
    netns, proto, local, remote, rport = key
    return {
        "netns": netns,
        "protocol": proto,
        "local_address": fmt_addr(local),
        "remote_address": fmt_addr(remote) if remote is not None else None,
        "remote_port": rport if remote is not None else None,
        "used": used,
        "time_wait": time_wait,
        "available": available,
        "percent": round(100.0 * used / available, 1) if available > 0 else 100.0,
        "ratio": used / available if available > 0 else 1.0,
    }
