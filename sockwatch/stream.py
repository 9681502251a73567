"""The event stream's rules: what each hook record means to a person (pure; no I/O).

A record becomes a `StreamEvent` in two steps around the tracker's apply: `describe`
runs before (the socket's row, if any, still holds what the record does not carry: its
owner, when it was born), and the agent completes the rest after (an accepted
connection's owner from its listener, the local side the kernel chose for a connected
UDP socket, who holds a port a bind failed on).

How a local port was set is the `bind` field: "asked" (bind() named it), "port 0"
(bind() let the kernel choose), "no port" (IP_BIND_ADDRESS_NO_PORT: the port comes at
connect), "connect", "listen" or "sendto" (an implicit bind by that call), or None.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from sockwatch import events as ev
from sockwatch.events import Event
from sockwatch.model import IPPROTO_TCP, R_ACTIVE, STATE_NAMES, SockRow, TcpState, fmt_addr

KINDS = ("bind", "bind_fail", "listen", "connect", "accept", "state", "close", "lost")
MAX_BOUND = 65536  # TCP sockets bound but not yet listening or connecting, remembered


@dataclass(slots=True)
class StreamEvent:
    kind: str
    row: SockRow  # the socket as this event leaves it (filters match on it)
    ts_ns: int  # CLOCK_MONOTONIC
    old_state: int | None = None
    bind: str | None = None
    errno: int = 0
    holders: list[SockRow] = field(default_factory=list)
    lifetime: dict | None = None

    def as_dict(self, wall_offset: float) -> dict:
        d = {"time": round(self.ts_ns / 1e9 + wall_offset, 6), "kind": self.kind, **self.row.as_dict()}
        if self.kind == "bind_fail":  # what was asked for, not a socket in any table
            d["state"] = None
        if self.old_state is not None:
            d["old_state"] = STATE_NAMES.get(self.old_state, str(self.old_state))
        if self.bind is not None:
            d["bind"] = self.bind
        if self.errno:
            d["errno"] = errno.errorcode.get(self.errno, str(self.errno))
            d["error"] = os.strerror(self.errno)
            d["holders"] = [_holder(h) for h in self.holders]
        if self.lifetime is not None:
            d["lifetime"] = self.lifetime
        return d

    def json_line(self, wall_offset: float) -> bytes:
        return json.dumps(self.as_dict(wall_offset), separators=(",", ":")).encode() + b"\n"


def _holder(r: SockRow) -> dict:
    return {
        "pid": r.pid,
        "comm": r.comm,
        "cookie": r.cookie,
        "inode": r.inode,
        "protocol": r.proto_name,
        "local_address": fmt_addr(r.local_address),
        "local_port": r.local_port,
        "state": r.state_name,
    }


def lost_line(events: int, owners: int, wall_time: float) -> bytes:
    """Said to every subscriber when the hooks lost records: the stream has a gap there
    (the table itself is resynced)."""
    return (
        json.dumps(
            {"time": round(wall_time, 6), "kind": "lost", "events": events, "udp_owners": owners},
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def lifetime(e: Event, born_ns: int, active: bool) -> dict:
    """A TCP connection's totals at its close, as tcplife reports them, but in payload
    bytes: the kernel's counters also count the SYN and FIN sequence numbers, which the
    path to CLOSE tells (`active`: opened by connect(), so its SYN was acknowledged).
    The duration is to the kernel's tick, and only if the birth was seen."""
    acked, received = ev.life(e)
    old = e.old_state
    fin_acked = old in (TcpState.FIN_WAIT2, TcpState.LAST_ACK, TcpState.CLOSING)
    fin_received = old in (TcpState.FIN_WAIT2, TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING)
    syn_acked = active and old != TcpState.SYN_SENT
    return {
        "seconds": round((e.ts_ns - born_ns) / 1e9, 6) if born_ns else None,
        "bytes_sent": max(0, acked - fin_acked - syn_acked),  # and acknowledged by the peer
        "bytes_received": max(0, received - fin_received),
        "retransmits": e.pid,
        "srtt_us": e.uid,
    }


class Describer:
    """Turns hook records into stream events. Keeps one thing across records: which TCP
    sockets bind() gave a port, so that a later connect or listen can say whether the
    kernel chose the port (bounded; it only runs while someone subscribes)."""

    def __init__(self) -> None:
        self.bound: dict[int, int] = {}  # cookie -> port bind() left it with

    def describe(
        self, e: Event, row: SockRow | None, make_row: Callable[[Event], SockRow | None]
    ) -> StreamEvent | None:
        """`row`: the tracker's row for the cookie before this record; `make_row(e)` a
        row from the record alone (the tracker's rule), or None if its namespace is gone."""
        kind = e.kind
        if kind in (ev.STATE, ev.RELEASE) and row is not None:
            new = _copy(row)  # these records carry no owner (and a release no address)
        else:
            made = make_row(e)
            if made is None:
                return None
            new = made
            if kind == ev.RELEASE:
                new.state = e.old_state
            if row is not None and new.pid is None:
                new.pid, new.uid, new.comm = row.pid, row.uid, row.comm
        if kind == ev.STATE:
            new.state = e.state
        born = row.born_ns if row is not None else 0
        out = StreamEvent(_kind(e), new, e.ts_ns)
        if kind == ev.BIND:
            if e.protocol == IPPROTO_TCP:
                self._remember(e.cookie, e.local_port)
            out.bind = "asked" if e.flags & ev.F_PORT_ASKED else ("port 0" if e.local_port else "no port")
        elif kind == ev.BIND_FAIL:
            out.errno = e.err
            out.bind = "asked" if e.flags & ev.F_PORT_ASKED else "port 0"
        elif kind in (ev.LISTEN, ev.CONNECT):
            if not self.bound.pop(e.cookie, 0):
                out.bind = "listen" if kind == ev.LISTEN else "connect"
        elif kind == ev.UDP_CONNECT:
            if row is None or not row.local_port:
                out.bind = "connect"
            new.local_address, new.local_port = (row.local_address, row.local_port) if row else (new.local_address, 0)
        elif kind == ev.STATE:
            out.old_state = e.old_state
            if e.state == TcpState.CLOSE and e.old_state != TcpState.LISTEN:
                active = row is not None and bool(row.flags & R_ACTIVE)
                out.lifetime = lifetime(e, born, active) if e.flags & ev.F_LIFETIME else None
                self.bound.pop(e.cookie, None)
        elif kind == ev.RELEASE:
            self.bound.pop(e.cookie, None)
            if born:
                out.lifetime = {"seconds": round((e.ts_ns - born) / 1e9, 6)}
        return out

    def _remember(self, cookie: int, port: int) -> None:
        if len(self.bound) >= MAX_BOUND:
            del self.bound[next(iter(self.bound))]  # the oldest: bound long ago and never used
        self.bound[cookie] = port


def _kind(e: Event) -> str:
    if e.kind == ev.STATE:
        return "close" if e.state == TcpState.CLOSE else "state"
    return {
        ev.BIND: "bind",
        ev.BIND_FAIL: "bind_fail",
        ev.LISTEN: "listen",
        ev.CONNECT: "connect",
        ev.UDP_CONNECT: "connect",
        ev.ACCEPT: "accept",
        ev.RELEASE: "close",
    }.get(e.kind, "unknown")


def _copy(row: SockRow) -> SockRow:
    return SockRow(
        cookie=row.cookie,
        protocol=row.protocol,
        family=row.family,
        state=row.state,
        local_address=row.local_address,
        local_port=row.local_port,
        remote_address=row.remote_address,
        remote_port=row.remote_port,
        netns=row.netns,
        inode=row.inode,
        pid=row.pid,
        comm=row.comm,
        uid=row.uid,
        owner_source=row.owner_source,
        netns_cookie=row.netns_cookie,
        flags=row.flags,
        born_ns=row.born_ns,
    )


def closed(row: SockRow) -> SockRow:
    """A copy of row as no lookup table has it any more (for later records of a batch)."""
    gone = _copy(row)
    gone.local_port = 0
    return gone


def conflicts(rows: list[SockRow], want: SockRow) -> list[SockRow]:
    """Sockets in `rows` that hold the port a bind of `want` asked for: same namespace,
    protocol and port, and addresses that overlap (equal, or either a wildcard; an IPv6
    wildcard may also take IPv4). Listeners and unconnected sockets first."""
    out = []
    for r in rows:
        if r.netns != want.netns or r.protocol != want.protocol or r.local_port != want.local_port:
            continue
        if _overlap(r, want):
            out.append(r)
    out.sort(key=lambda r: (r.is_connection, r.cookie))
    return out


def _overlap(a: SockRow, b: SockRow) -> bool:
    if a.local_address == b.local_address:
        return True
    for x, y in ((a, b), (b, a)):
        if not int(x.local_address) and x.family in (y.family, 6):
            return True  # a wildcard holds every address of its family (v6: v4 too, unless v6only)
    mapped = getattr(a.local_address, "ipv4_mapped", None) or getattr(b.local_address, "ipv4_mapped", None)
    return mapped is not None and mapped in (a.local_address, b.local_address)
