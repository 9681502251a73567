"""The socket table's rows and the vocabulary of the kernel's tables (pure; no root).

A row is one TCP or UDP socket as the kernel keys it: UDP and TCP listeners by
(local IP, local port), TCP connections and connected UDP by the 4-tuple.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field
from enum import IntEnum

from sockwatch.containers import Container

IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}
FAMILY_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}


class TcpState(IntEnum):
    """Kernel numbering (include/net/tcp_states.h); UDP uses CLOSE and ESTABLISHED."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13


# ss's names for the states (iproute2 misc/ss.c sstate_name); CLOSE prints as UNCONN.
STATE_NAMES = {
    1: "ESTAB",
    2: "SYN-SENT",
    3: "SYN-RECV",
    4: "FIN-WAIT-1",
    5: "FIN-WAIT-2",
    6: "TIME-WAIT",
    7: "UNCONN",
    8: "CLOSE-WAIT",
    9: "LAST-ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "SYN-RECV",
    13: "BOUND",
}
STATE_NUMBERS = {name: num for num, name in STATE_NAMES.items() if num != 12}

# Where a row's owner came from, best first.
OWNER_HOOK = "hook"  # sock_create/bind ran in the owner's context
OWNER_LISTENER = "listener"  # an accepted connection: its listener's owner
OWNER_PROC = "proc"  # a /proc/*/fd scan found the inode


R_ACTIVE = 0x04  # SockRow.flags: opened by connect() (the tracker's other bits live there)


@dataclass(slots=True)
class SockRow:
    """One socket. Addresses are ipaddress objects; ports host-order ints."""

    cookie: int
    protocol: int
    family: int  # 4 or 6
    state: int  # TcpState numbering
    local_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    local_port: int
    remote_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    remote_port: int = 0
    netns: int = 0  # inode of the network namespace, as in /proc/PID/ns/net
    inode: int | None = None  # socket inode (0 for TIME-WAIT); None until read from the kernel
    pid: int | None = None
    comm: str | None = None
    uid: int | None = None
    owner_source: str | None = None
    netns_cookie: int = 0
    flags: int = 0  # the tracker's bookkeeping bits
    gen: int = 0  # the tracker's batch that last set it from an event
    born_ns: int = 0  # CLOCK_MONOTONIC when a hook, or for a connection a kernel read, first saw it; 0: at start
    container: Container | None = None  # the owner's cgroup, container and pod, set with the owner
    _json: bytes | None = field(default=None, repr=False, compare=False)
    _sort: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.protocol, str(self.protocol))

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "UNKNOWN")

    @property
    def is_connection(self) -> bool:
        """Keyed by the 4-tuple (TCP connection or connected UDP)."""
        return self.remote_address is not None and self.remote_port != 0

    @property
    def visible(self) -> bool:
        """In the kernel's lookup tables (what ss lists): bound to a port, not closed TCP."""
        if self.local_port == 0:
            return False
        if self.protocol == IPPROTO_TCP and self.state in (TcpState.CLOSE, TcpState.BOUND_INACTIVE):
            return False
        return True

    def key(self) -> tuple:
        """The kernel's demultiplexing key for this socket."""
        if self.is_connection:
            return (
                self.netns,
                self.protocol,
                self.local_address,
                self.local_port,
                self.remote_address,
                self.remote_port,
            )
        return (self.netns, self.protocol, self.local_address, self.local_port)

    def touch(self) -> None:
        """Drop the cached rendering after a change."""
        self._json = None
        self._sort = None

    def as_dict(self) -> dict:
        return {
            "protocol": self.proto_name,
            "family": self.family,
            "state": self.state_name,
            "local_address": fmt_addr(self.local_address),
            "local_port": self.local_port,
            "remote_address": fmt_addr(self.remote_address)
            if self.remote_address is not None and self.is_connection
            else None,
            "remote_port": self.remote_port if self.is_connection else 0,
            "pid": self.pid,
            "comm": self.comm,
            "uid": self.uid,
            "inode": self.inode,
            "cookie": self.cookie,
            "netns": self.netns,
            "owner_source": self.owner_source,
            "container": self.container.as_dict() if self.container is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SockRow:
        """The inverse of as_dict (a front end rebuilding rows from the agent's JSON)."""
        remote = d["remote_address"]
        return cls(
            cookie=d["cookie"],
            protocol=PROTO_NUMBERS[d["protocol"]],
            family=d["family"],
            state=STATE_NUMBERS.get(d["state"], 0),
            local_address=ipaddress.ip_address(d["local_address"]),
            local_port=d["local_port"],
            remote_address=ipaddress.ip_address(remote) if remote else None,
            remote_port=d["remote_port"],
            netns=d["netns"],
            inode=d["inode"],
            pid=d["pid"],
            comm=d["comm"],
            uid=d["uid"],
            owner_source=d.get("owner_source"),
            container=Container.from_dict(d["container"]) if d.get("container") is not None else None,
        )

    def json_bytes(self) -> bytes:
        """The row as JSON, rendered once per change (the agent answers with these)."""
        if self._json is None:
            self._json = json.dumps(self.as_dict(), separators=(",", ":")).encode()
        return self._json


def fmt_addr(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """As ss prints it: v4-mapped IPv6 keeps its dotted quad (::ffff:127.0.0.1)."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(addr)


_WILDCARDS: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {
    4: ipaddress.IPv4Address(0),
    6: ipaddress.IPv6Address(0),
}


def wildcard(family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return _WILDCARDS[family]  # made once: this runs per row in whole-table passes


def sort_key(row: SockRow) -> tuple:
    """Group as the kernel keys sockets: UDP, then TCP listeners, then TCP connections."""
    if row._sort is None:
        row._sort = _sort_key(row)
    return row._sort


def _sort_key(row: SockRow) -> tuple:
    group = 0 if row.protocol == IPPROTO_UDP else (1 if row.state == TcpState.LISTEN else 2)
    return (
        row.netns,
        group,
        row.local_port,
        row.family,
        int(row.local_address),
        int(row.remote_address) if row.remote_address is not None else -1,
        row.remote_port,
        row.cookie,
    )


def render_json(rows: list[SockRow]) -> bytes:
    """A JSON array built from the per-row cache: no re-encoding of unchanged rows."""
    return b"[" + b",\n".join(r.json_bytes() for r in rows) + b"]\n"
