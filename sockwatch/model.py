"""The socket table's rows and the vocabulary of the kernel's tables (pure; no root).

A row is one TCP or UDP socket as the kernel keys it: UDP and TCP listeners by
(local IP, local port), TCP connections and connected UDP by the 4-tuple.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from sockwatch.containers import Container, is_container
from sockwatch.schema import FAMILY_NAMES, family_number

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
    bound_dev: int = 0  # SO_BINDTODEVICE's ifindex (in its namespace); 0: any device
    device: str | None = None  # that device's name, once read; None: not bound (or not named yet)
    # Recv-Q and Send-Q as ss prints them, for what the kernel keys by (IP, port), read at
    # each query: a listener's accept queue and its backlog, a UDP socket's bytes queued.
    # None for a connection (they move with every packet; `ss -tn` shows them).
    recv_q: int | None = None
    send_q: int | None = None
    # The same read's SK_MEMINFO (sockwatch.drops): packets the socket dropped (sk_drops),
    # and a UDP socket's receive memory in use and its limit (SO_RCVBUF). None: not read.
    drops: int | None = None
    rmem: int | None = None
    rcvbuf: int | None = None

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

    def as_dict(self) -> dict:
        remote = self.remote_address is not None and self.is_connection and self.remote_port != 0
        return {
            "protocol": self.proto_name,
            "family": FAMILY_NAMES[self.family],
            "state": self.state_name,
            "local_address": fmt_addr(self.local_address),
            "local_port": self.local_port,
            "remote_address": fmt_addr(self.remote_address) if remote else None,  # type: ignore[arg-type]
            "remote_port": self.remote_port if remote else None,  # no peer: both null
            "pid": self.pid,
            "comm": self.comm,
            "uid": self.uid,
            "inode": self.inode,
            "cookie": self.cookie,
            "netns": self.netns,
            "owner_source": self.owner_source,
            "container": self.container.as_dict()
            if self.container is not None and is_container(self.container)
            else None,
            "device": self.device_label,
            "recv_q": self.recv_q,
            "send_q": self.send_q,
        }

    @property
    def device_label(self) -> str | None:
        """The bound device as ss shows it (its name; its index until named); None: any."""
        if self.device is not None:
            return self.device
        return f"if{self.bound_dev}" if self.bound_dev else None

    @classmethod
    def from_dict(cls, d: dict) -> SockRow:
        """The inverse of as_dict (a front end rebuilding rows from the agent's JSON)."""
        remote = d["remote_address"]
        return cls(
            cookie=d["cookie"],
            protocol=PROTO_NUMBERS[d["protocol"]],
            family=family_number(d["family"]),
            state=STATE_NUMBERS.get(d["state"], 0),
            local_address=ipaddress.ip_address(d["local_address"]),
            local_port=d["local_port"],
            remote_address=ipaddress.ip_address(remote) if remote else None,
            remote_port=d["remote_port"] or 0,
            netns=d["netns"],
            inode=d["inode"],
            pid=d["pid"],
            comm=d["comm"],
            uid=d["uid"],
            owner_source=d.get("owner_source"),
            container=Container.from_dict(d["container"]) if d.get("container") is not None else None,
            device=d.get("device"),
            recv_q=d.get("recv_q"),
            send_q=d.get("send_q"),
        )


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
    """Group as the kernel keys sockets: UDP, then TCP listeners, then TCP connections.
    Made when a sort asks, not kept per row (100,000 keys are 12 MiB; the tracker keeps
    the sorted table instead, once per version)."""
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


# render_json's pieces that repeat from row to row, each rendered once (bounded: a
# table of 100,000 rows has a few hundred distinct addresses, names and containers)
_CACHE_MAX = 1 << 16
_addr_json: dict[object, str] = {}
_str_json: dict[str | None, str] = {None: "null"}
_container_json: dict[Container | None, str] = {None: "null"}
_head_json: dict[tuple[int, int, int], str] = {}


def _cached(cache: dict, key: object, make: Callable[[], str]) -> str:
    if len(cache) >= _CACHE_MAX:
        keep = cache.get(None)
        cache.clear()
        if keep is not None:
            cache[None] = keep
    v = cache[key] = make()
    return v


def row_json(r: SockRow) -> str:
    """The row as as_dict() renders with json.dumps(separators=(",", ":")), byte for
    byte, in a fraction of its time: the snapshot of a large table renders every row,
    and per-row caches would cost more memory than the rows (tests hold it to json.dumps)."""
    head = _head_json.get((r.protocol, r.family, r.state))
    if head is None:
        head = _cached(_head_json, (r.protocol, r.family, r.state), lambda: (
            f'{{"protocol":{json.dumps(r.proto_name)},"family":"{FAMILY_NAMES[r.family]}",'
            f'"state":{json.dumps(r.state_name)},'
            '"local_address":'))  # fmt: skip
    la = _addr_json.get(r.local_address)
    if la is None:
        la = _cached(_addr_json, r.local_address, lambda: json.dumps(fmt_addr(r.local_address)))
    ra = rport = "null"  # no peer: both null
    if r.remote_address is not None and r.remote_port != 0:
        rport = str(r.remote_port)
        ra = _addr_json.get(r.remote_address)  # type: ignore[assignment]
        if ra is None:
            ra = _cached(_addr_json, r.remote_address, lambda: json.dumps(fmt_addr(r.remote_address)))  # type: ignore[arg-type]
    comm = _str_json.get(r.comm)
    if comm is None:
        comm = _cached(_str_json, r.comm, lambda: json.dumps(r.comm))
    source = _str_json.get(r.owner_source)
    if source is None:
        source = _cached(_str_json, r.owner_source, lambda: json.dumps(r.owner_source))
    c = _container_json.get(r.container)
    if c is None:
        c = _cached(_container_json, r.container, lambda: json.dumps(
            r.container.as_dict() if is_container(r.container) else None, separators=(",", ":")))  # type: ignore[union-attr]  # fmt: skip
    pid, uid, inode, rq, sq = r.pid, r.uid, r.inode, r.recv_q, r.send_q
    return (
        f'{head}{la},"local_port":{r.local_port},"remote_address":{ra},"remote_port":{rport},'
        f'"pid":{"null" if pid is None else int(pid)},"comm":{comm},"uid":{"null" if uid is None else int(uid)},'
        f'"inode":{"null" if inode is None else int(inode)},"cookie":{int(r.cookie)},"netns":{int(r.netns)},'
        f'"owner_source":{source},"container":{c},"device":{_device_json(r)},'
        f'"recv_q":{"null" if rq is None else int(rq)},"send_q":{"null" if sq is None else int(sq)}}}'
    )


def _device_json(r: SockRow) -> str:
    label = r.device_label
    return "null" if label is None else json.dumps(label)


def render_json(rows: Sequence[SockRow]) -> bytes:
    """A JSON array, one object per row, one row per line. Rendered in slices so that
    the whole table never exists as 100,000 separate strings at once."""
    parts = [b"["]
    for i in range(0, len(rows), 4096):
        if i:
            parts.append(b",\n")
        parts.append(",\n".join(map(row_json, rows[i : i + 4096])).encode())
    parts.append(b"]\n")
    return b"".join(parts)
