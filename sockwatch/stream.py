"""The event stream's rules: what each hook record means to a person (pure; no I/O).

A record becomes a `StreamEvent` in two steps around the tracker's apply: `describe`
runs before (what the socket's earlier records or its table row say and this record
does not carry: its owner, when it was born, whether connect() opened it), and the
agent completes the rest after (an accepted connection's owner from its listener, the
local side the kernel chose for a connected UDP socket).

How a local port was set is the `bind` field: "asked" (bind() named it), "port 0"
(bind() let the kernel choose), "no port" (IP_BIND_ADDRESS_NO_PORT: the port comes at
connect), "connect", "listen" or "sendto" (an implicit bind by that call), or None.

This runs for every record while someone subscribes (tens of thousands a second under
churn), so a socket is a plain tuple of printable values, strings are formatted once
(cached), and a line is one template, not a dict through json.dumps.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from sockwatch import events as ev
from sockwatch.containers import Container, is_container
from sockwatch.events import Event
from sockwatch.model import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    PROTO_NAMES,
    R_ACTIVE,
    STATE_NAMES,
    SockRow,
    TcpState,
    fmt_addr,
)
from sockwatch.schema import FAMILY_NAMES, SCHEMA_VERSION

MAX_BOUND = 65536  # TCP sockets bound but not yet listening or connecting, remembered


class Sock(NamedTuple):
    """One socket as the stream shows it, all values ready to print. Its state is the
    event's (a state change reuses the socket's tuple as it is)."""

    cookie: int
    netns: int
    family: int  # 4 or 6
    protocol: int
    local: str
    local_port: int
    remote: str | None
    remote_port: int
    pid: int | None
    uid: int | None
    comm: str | None
    born_ns: int
    active: bool  # opened by connect()


_text = functools.lru_cache(maxsize=65536)(fmt_addr)  # an address as the stream prints it


@functools.lru_cache(maxsize=4096)
def _json_str(s: str | None) -> str:
    return json.dumps(s)


def sock_of_event(e: Event, netns: int) -> Sock:
    d = ev.decode(e)
    pid, uid, comm = d.owner or (None, None, None)
    return Sock(
        e.cookie,
        netns,
        d.family,
        e.protocol,
        _text(d.local),
        e.local_port,
        _text(d.remote) if d.remote is not None else None,
        e.remote_port,
        pid,
        uid,
        comm,
        e.ts_ns,
        e.kind == ev.CONNECT,
    )


def sock_of_row(r: SockRow) -> Sock:
    return Sock(
        r.cookie,
        r.netns,
        r.family,
        r.protocol,
        fmt_addr(r.local_address),
        r.local_port,
        fmt_addr(r.remote_address) if r.remote_address is not None and r.is_connection else None,
        r.remote_port if r.is_connection else 0,
        r.pid,
        r.uid,
        r.comm,
        r.born_ns,
        bool(r.flags & R_ACTIVE),
    )


@dataclass(slots=True)
class StreamEvent:
    kind: str
    sock: Sock  # the socket as this event leaves it
    state: int
    ts_ns: int  # CLOCK_MONOTONIC
    old_state: int | None = None
    bind: str | None = None
    errno: int = 0
    holders: list[tuple[Sock, int]] = field(default_factory=list)  # (socket, its state)
    lifetime: dict | None = None
    explain: str | None = None  # bind_fail: the `sockwatch explain bind` command that replays it
    bind_opts: int = 0  # bind_fail: B_* as the hook read them
    bound_dev: int = 0  # bind_fail: the device's ifindex, with B_DEVICE

    def json_line(self, wall_offset: float, container: Container | None = None) -> bytes:
        """One JSON line; `container`: the owner's, looked up by the agent."""
        s = self.sock
        state = "null" if self.kind == "bind_fail" else f'"{STATE_NAMES.get(self.state, self.state)}"'
        line = (
            f'{{"schema_version":{SCHEMA_VERSION},"time":{self.ts_ns / 1e9 + wall_offset:.6f},"kind":"{self.kind}",'
            f'"protocol":"{PROTO_NAMES.get(s.protocol, s.protocol)}","family":"{FAMILY_NAMES.get(s.family)}",'
            f'"state":{state},"local_address":"{s.local}","local_port":{s.local_port},'
            f'"remote_address":{_json_str(s.remote)},"remote_port":{"null" if s.remote is None else s.remote_port},'
            f'"pid":{_num(s.pid)},"comm":{_json_str(s.comm)},"uid":{_num(s.uid)},'
            f'"cookie":{s.cookie},"netns":{s.netns},"container":{_container_json(container)}'
        )
        if self.old_state is not None:
            line += f',"old_state":"{STATE_NAMES.get(self.old_state, self.old_state)}"'
        if self.bind is not None:
            line += f',"bind":"{self.bind}"'
        if self.errno:
            holders = json.dumps([_holder(h) for h in self.holders], separators=(",", ":"))
            line += (f',"errno":"{errno.errorcode.get(self.errno, self.errno)}",'
                     f'"error":{json.dumps(os.strerror(self.errno))},"holders":{holders}')  # fmt: skip
            if self.explain is not None:
                line += f',"explain":{json.dumps(self.explain)}'
        life = self.lifetime
        if life is not None:
            secs = "null" if life["seconds"] is None else life["seconds"]
            line += f',"lifetime":{{"seconds":{secs}'
            if "bytes_sent" in life:
                line += (f',"bytes_sent":{life["bytes_sent"]},"bytes_received":{life["bytes_received"]},'
                         f'"retransmits":{life["retransmits"]},"srtt_us":{life["srtt_us"]}')  # fmt: skip
            line += "}"
        return (line + "}\n").encode()


@functools.lru_cache(maxsize=4096)
def _container_json(c: Container | None) -> str:
    return json.dumps(c.as_dict(), separators=(",", ":")) if c is not None and is_container(c) else "null"


def _num(n: int | None) -> str:
    return "null" if n is None else str(n)


def _holder(h: tuple[Sock, int]) -> dict:
    s, state = h
    return {
        "pid": s.pid,
        "comm": s.comm,
        "cookie": s.cookie,
        "protocol": PROTO_NAMES.get(s.protocol, str(s.protocol)),
        "local_address": s.local,
        "local_port": s.local_port,
        "state": STATE_NAMES.get(state, str(state)),
    }


def lost_line(events: int, wall_time: float, reason: str) -> bytes:
    """Said to subscribers when records were lost to them: the stream has a gap there.
    reason "ring": the hooks found the ring full (the table itself is resynced);
    "stream": the agent's stream work hit its CPU budget and skipped them (the table
    has them)."""
    return (
        f'{{"schema_version":{SCHEMA_VERSION},"time":{wall_time:.6f},"kind":"lost","events":{events},'
        f'"reason":"{reason}"}}\n'
    ).encode()


def miss_line(wall_time: float, netns: int, protocol: int, port: int, misses: int, addresses: list[str]) -> bytes:
    """Said to subscribers each second a port's lookups found no socket (the sender got
    RST or ICMP port unreachable): how many, and to which local addresses."""
    return (json.dumps({"schema_version": SCHEMA_VERSION, "time": round(wall_time, 6), "kind": "miss", "netns": netns,
                        "protocol": "tcp" if protocol == 6 else "udp", "local_address": addresses[0],
                        "local_port": port, "misses": misses, "addresses": addresses[:16]},
                       separators=(",", ":")) + "\n").encode()  # fmt: skip


def drop_line(wall_time: float, row: dict, drops: int, reasons: dict[str, int]) -> bytes:
    """Said to subscribers each second a socket dropped packets it was handed: how many
    since the last line, by the kernel's reason, with the socket (`row`: as the drops
    view has it: sockwatch.drops.report)."""
    return (json.dumps({"schema_version": SCHEMA_VERSION, "time": round(wall_time, 6), "kind": "drop",
                        "netns": row["netns"], "protocol": row["protocol"], "family": row["family"],
                        "state": row["state"], "local_address": row["local_address"], "local_port": row["local_port"],
                        "remote_address": row["remote_address"], "remote_port": row["remote_port"],
                        "cookie": row["cookie"], "pid": row["pid"], "comm": row["comm"], "container": row["container"],
                        "drops": drops, "reasons": reasons, "queue": row["queue"]},
                       separators=(",", ":")) + "\n").encode()  # fmt: skip


def explain_bind_command(s: Sock, opts: int, device: str | None) -> str:
    """The `sockwatch explain bind` command that asks again about a failed bind: its
    address, port and options as the hook read them, its owner's uid, its namespace."""
    where = f"[{s.local}]:{s.local_port}" if s.family == 6 else f"{s.local}:{s.local_port}"
    flags = [f for f, bit in (("--reuseaddr", ev.B_REUSEADDR), ("--reuseport", ev.B_REUSEPORT)) if opts & bit]
    if device:
        flags += ["--device", shlex.quote(device)]
    uid = ["--uid", str(s.uid)] if s.uid is not None else []
    return " ".join(["sockwatch", "explain", "bind", PROTO_NAMES.get(s.protocol, "tcp"), shlex.quote(where), *flags,
                     *uid, "--netns", str(s.netns)])  # fmt: skip


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


_KIND = {
    ev.BIND: "bind",
    ev.BIND_FAIL: "bind_fail",
    ev.LISTEN: "listen",
    ev.CONNECT: "connect",
    ev.UDP_CONNECT: "connect",
    ev.ACCEPT: "accept",
    ev.RELEASE: "close",
}


class Describer:
    """Turns hook records into stream events. Keeps two things across records (bounded;
    it only runs while someone subscribes): which TCP sockets bind() gave a port, so that
    a later connect or listen can say whether the kernel chose the port, and each open
    connection as its connect or accept said (the table reads connections from the
    kernel only when a view asks), so that its state changes and its close have its
    owner, its birth and which side opened it."""

    def __init__(self) -> None:
        self.bound: dict[int, int] = {}  # cookie -> port bind() left it with
        self.conns: dict[int, Sock] = {}  # cookie -> an open TCP connection, until its close

    def describe(self, e: Event, before: Sock | None, netns: Callable[[Event], int | None]) -> StreamEvent | None:
        """`before`: the socket as its earlier records or its table row left it;
        `netns(e)`: the record's namespace inode, or None if it is gone unseen."""
        kind = e.kind
        if kind == ev.RELEASE and e.protocol == IPPROTO_UDP and before is None:
            return None  # a UDP socket nothing saw with a port (the hook cannot read it): in no table
        if kind == ev.RELEASE and e.protocol == IPPROTO_TCP and before is not None and before.born_ns:
            # a TCP socket a hook saw born has state callbacks: its end comes with them (the
            # hook's prestart cookie bound is not exact: cookies are handed out per CPU)
            return None
        if kind in (ev.STATE, ev.RELEASE) and before is not None:
            sock = before  # these records carry no owner (and a release no address): the rest is known
        else:
            ns = before.netns if before is not None else netns(e)
            if ns is None:
                return None
            sock = sock_of_event(e, ns)
            if before is not None:
                sock = sock._replace(
                    pid=before.pid if sock.pid is None else sock.pid,
                    uid=before.uid if sock.pid is None else sock.uid,
                    comm=before.comm if sock.pid is None else sock.comm,
                    born_ns=before.born_ns or sock.born_ns,
                    active=before.active or sock.active,
                )
        state = e.old_state if kind == ev.RELEASE else e.state
        closed = kind == ev.STATE and e.state == TcpState.CLOSE
        out = StreamEvent("close" if closed else _KIND.get(kind, "state"), sock, state, e.ts_ns)
        if kind == ev.BIND:
            if e.protocol == IPPROTO_TCP:
                self._remember(e.cookie, e.local_port)
            out.bind = "asked" if e.flags & ev.F_PORT_ASKED else ("port 0" if e.local_port else "no port")
        elif kind == ev.BIND_FAIL:
            out.errno = e.err
            out.bind = "asked" if e.flags & ev.F_PORT_ASKED else "port 0"
            out.bind_opts = e.bind_opts
            out.bound_dev = int.from_bytes(e.remote_addr[:4], "little") if e.bind_opts & ev.B_DEVICE else 0
        elif kind in (ev.LISTEN, ev.CONNECT):
            if not self.bound.pop(e.cookie, 0):
                out.bind = "listen" if kind == ev.LISTEN else "connect"
            if kind == ev.CONNECT:
                self.remember_conn(out.sock)
        elif kind == ev.UDP_CONNECT:
            if before is None or not before.local_port:
                out.bind = "connect"
            # the kernel picks the local side after the hook: the agent reads it
            out.sock = sock._replace(local=before.local if before else sock.local,
                                     local_port=before.local_port if before else 0)  # fmt: skip
        elif kind == ev.STATE:
            out.old_state = e.old_state
            if e.state == TcpState.CLOSE:
                if e.flags & ev.F_LIFETIME and e.old_state != TcpState.LISTEN:
                    out.lifetime = lifetime(e, sock.born_ns, sock.active)
                self.bound.pop(e.cookie, None)
                self.conns.pop(e.cookie, None)
        elif kind == ev.ACCEPT:
            self.remember_conn(out.sock)
        elif kind == ev.RELEASE:
            self.bound.pop(e.cookie, None)
            if sock.born_ns:
                out.lifetime = {"seconds": round((e.ts_ns - sock.born_ns) / 1e9, 6)}
        return out

    def remember_conn(self, sock: Sock) -> None:
        _bounded_put(self.conns, sock.cookie, sock)  # the oldest goes: its close was missed (a loss)

    def _remember(self, cookie: int, port: int) -> None:
        _bounded_put(self.bound, cookie, port)  # the oldest goes: bound long ago and never used


def _bounded_put(d: dict, key: int, value: object) -> None:
    """d[key] = value, dropping the oldest entry past MAX_BOUND."""
    if len(d) >= MAX_BOUND and key not in d:
        del d[next(iter(d))]
    d[key] = value


def holds(said: StreamEvent) -> bool:
    """Still in a lookup table after this event: a closed socket holds no port."""
    if not said.sock.local_port or said.kind in ("bind_fail", "close"):
        return False
    return said.sock.protocol != IPPROTO_TCP or said.kind != "bind"  # a bound TCP socket is in no table yet


def conflicts(socks: list[tuple[Sock, int]], want: Sock) -> list[tuple[Sock, int]]:
    """(socket, state) pairs that hold the port a bind of `want` asked for: same
    namespace, protocol and port, and addresses that overlap (equal, or either a
    wildcard; an IPv6 wildcard may also take IPv4). Listeners and unconnected first."""
    out = [
        (s, st)
        for s, st in socks
        if s.netns == want.netns and s.protocol == want.protocol and s.local_port == want.local_port
        and _overlap(s, want)
    ]  # fmt: skip
    out.sort(key=lambda h: (h[0].remote is not None, h[0].cookie))
    return out


_WILDCARD = {4: "0.0.0.0", 6: "::"}


def _overlap(a: Sock, b: Sock) -> bool:
    if a.local == b.local:
        return True
    for x, y in ((a, b), (b, a)):
        if x.local == _WILDCARD[x.family] and x.family in (y.family, 6):
            return True  # a wildcard holds every address of its family (v6: v4 too, unless v6only)
    return a.local == f"::ffff:{b.local}" or b.local == f"::ffff:{a.local}"


class Match:
    """An event as Filters.match sees a row (addresses as ipaddress objects); built
    only for subscribers that filter."""

    __slots__ = ("local_address", "local_port", "netns", "pid", "protocol", "remote_address", "remote_port", "state")

    def __init__(self, said: StreamEvent) -> None:
        s = said.sock
        self.protocol, self.state, self.pid, self.netns = s.protocol, said.state, s.pid, s.netns
        self.local_port, self.remote_port = s.local_port, s.remote_port
        self.local_address = _ip(s.local)
        self.remote_address = _ip(s.remote) if s.remote is not None else None


@functools.lru_cache(maxsize=65536)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)
