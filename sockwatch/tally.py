"""Whole-table aggregates, kept from the rows that changed rather than recounted (pure;
no I/O): sockets by namespace, protocol, family and state; the listening sockets;
connections per listening port; and the port use that ephemeral-port pressure is
computed from. A scrape or a header reads these in O(what changed since the last
look), not O(sockets).

Each row is counted under its *shape* (the fields the aggregates key on). The tally
keeps no shape per row: whoever changes a row hands over the shape it had when the tally
last looked (the tracker keeps those for the rows changed since), so a row is uncounted
exactly as it was counted however it changed in between.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from sockwatch import ports
from sockwatch.demux import listener_order
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState

Address = object  # an ipaddress address (hashable)


class Shape(NamedTuple):
    netns: int
    protocol: int
    family: int
    state: int
    local_address: Address
    local_port: int
    remote_address: Address | None
    remote_port: int


def shape(row: SockRow) -> Shape | None:
    """What the aggregates know of a row; None if it is in no lookup table."""
    if not row.visible:
        return None
    remote = row.remote_address if row.is_connection else None
    return Shape(row.netns, row.protocol, row.family, row.state, row.local_address, row.local_port, remote,
                  row.remote_port if remote is not None else 0)  # fmt: skip


def _listening(s: Shape) -> bool:
    """Found by (IP, port): a TCP listener or an unconnected UDP socket."""
    return s.state == TcpState.LISTEN if s.protocol == IPPROTO_TCP else s.remote_address is None


def _bump(table: dict, key: object, sub: object, n: int) -> int:
    """Add n to table[key][sub]; returns 1 if sub appeared under key, -1 if it went, else 0."""
    c = table.get(key)
    if c is None:
        c = table[key] = Counter()
    before = c[sub]
    c[sub] = after = before + n
    if after <= 0:
        del c[sub]
        if not c:
            del table[key]
    return (after > 0) - (before > 0)


class Tally:
    def __init__(self, source: Callable[[], Iterable[SockRow]]) -> None:
        # the rows as they are now, for recounting a namespace whose range changed (the
        # port use kept is only what the range held: most connections' local ports are
        # not ephemeral, those accepted on a listener's port)
        self._source = source
        self.counts: Counter[tuple[int, int, int, int]] = Counter()  # (netns, proto, family, state)
        self.listening: dict[int, SockRow] = {}  # cookie -> TCP listener or unconnected UDP socket
        self.listening_version = 0  # bumped when that set changes
        self.accepted: dict[tuple[int, int], Counter] = {}  # (netns, port) -> (family, address) -> TCP conns
        self.ns_ports: dict[int, Counter] = {}  # netns -> local port -> sockets
        self.tcp_held: dict[int, Counter] = {}  # netns -> port -> TCP listeners on it
        # pressure keys, (netns, "tcp", local, remote, rport) or (netns, "udp", local, None, None):
        # (key, port) -> sockets, flat (one small dict per key would cost ~300 bytes a connection)
        # (ports in the namespace's range only; the key tuple is shared by its ports)
        self.used: Counter[tuple[tuple, int]] = Counter()
        self.used_tw: Counter[tuple[tuple, int]] = Counter()  # TCP: TIME-WAIT only
        self._ports_of: Counter[tuple] = Counter()  # key -> distinct ports
        self._key_objs: dict[tuple, tuple] = {}  # key -> the one tuple of it that used holds
        self._keys_in_ns: Counter[int] = Counter()  # netns -> keys
        self._n = 0  # rows counted
        # Per pressure key, counted as ports come and go under the namespace's range and
        # listeners as last seen (recounted when those change, which is rare): distinct
        # ephemeral ports in use (keys with none are left out) and TIME-WAIT connections on them.
        self._ns_seen: dict[int, PortsSeen] = {}
        self._n_used: dict[tuple, int] = {}
        self._n_tw: dict[tuple, int] = {}
        self._ranges: Mapping[int, ports.PortRange] = {}  # as last given: a new namespace starts with these
        self._ns_in_range: dict[int, tuple[ports.PortRange, int]] = {}  # netns -> (range, distinct ports in it)

    @classmethod
    def of(cls, rows: Iterable[SockRow], source: Callable[[], Iterable[SockRow]] | None = None) -> Tally:
        """The tally of `rows`; `source` gives the rows as they are later (default: these)."""
        if source is None:
            kept = list(rows)
            rows, source = kept, lambda: kept
        t = cls(source)
        for r in rows:
            t.update(r.cookie, None, r)
        return t

    def __len__(self) -> int:
        return self._n

    def update(self, cookie: int, old: Shape | None, row: SockRow | None) -> None:
        """The row for `cookie`, counted under `old` (None: not counted), is now `row`
        (None: gone)."""
        new = shape(row) if row is not None else None
        if new == old:
            if new is not None and cookie in self.listening:
                self.listening[cookie] = row  # type: ignore[assignment]  # the same socket, maybe a new object
            return
        if old is not None:
            self._n -= 1
            self._count(cookie, old, -1, None)
        if new is not None:
            self._n += 1
            self._count(cookie, new, 1, row)

    def _count(self, cookie: int, s: Shape, n: int, row: SockRow | None) -> None:
        key = (s.netns, s.protocol, s.family, s.state)
        self.counts[key] += n
        if self.counts[key] <= 0:
            del self.counts[key]
        if _bump(self.ns_ports, s.netns, s.local_port, n):
            cached = self._ns_in_range.get(s.netns)
            if cached is not None and cached[0].contains(s.local_port):
                self._ns_in_range[s.netns] = (cached[0], cached[1] + (1 if n > 0 else -1))
        if _listening(s):
            if n > 0:
                self.listening[cookie] = row  # type: ignore[assignment]
            else:
                self.listening.pop(cookie, None)
            self.listening_version += 1
        if s.protocol == IPPROTO_TCP:
            if s.state == TcpState.LISTEN:
                if _bump(self.tcp_held, s.netns, s.local_port, n):
                    self._held_changed(s.netns, s.local_port, n > 0)
            elif s.remote_address is not None and s.state != TcpState.TIME_WAIT:
                _bump(self.accepted, (s.netns, s.local_port), (s.family, s.local_address), n)
        self._use_of(s, n)

    def _use_of(self, s: Shape, n: int) -> None:
        """The port use of a TCP connection or a UDP socket."""
        if s.protocol == IPPROTO_TCP:
            if s.state != TcpState.LISTEN and s.remote_address is not None:
                k = (s.netns, "tcp", s.local_address, s.remote_address, s.remote_port)
                self._use(k, s.local_port, n, s.state == TcpState.TIME_WAIT)
        elif s.protocol == IPPROTO_UDP:
            self._use((s.netns, "udp", s.local_address, None, None), s.local_port, n, False)

    def _seen(self, netns: int) -> PortsSeen:
        seen = self._ns_seen.get(netns)
        if seen is None:
            rng = self._ranges.get(netns) or ports.PortRange(*ports.DEFAULT_RANGE)
            seen = self._ns_seen[netns] = PortsSeen(rng, frozenset(p for p in self.tcp_held.get(netns, ())
                                                                   if rng.contains(p)))  # fmt: skip
        return seen

    def _use(self, key: tuple, port: int, n: int, time_wait: bool) -> None:
        seen = self._seen(key[0])
        if not seen.range.contains(port):
            return  # never ephemeral while the range holds (a new range recounts the namespace)
        key = self._key_objs.get(key, key)
        kp = (key, port)
        appeared = _flat(self.used, kp, n)
        if time_wait:
            _flat(self.used_tw, kp, n)
        if seen.ephemeral(key, port):
            if appeared:
                _add(self._n_used, key, appeared)
            if time_wait:
                _add(self._n_tw, key, n)
        if appeared and (keyed := _flat(self._ports_of, key, appeared)):
            if keyed > 0:
                self._key_objs[key] = key
            else:
                del self._key_objs[key]
            _flat(self._keys_in_ns, key[0], appeared)

    def _held_changed(self, netns: int, port: int, held: bool) -> None:
        """A TCP listener took or left a port in the ephemeral range (rare): the keys
        using that port gain or lose it. One pass over what is in use."""
        seen = self._ns_seen.get(netns)
        if seen is None or not seen.range.contains(port):
            return
        self._ns_seen[netns] = PortsSeen(seen.range, seen.held | {port} if held else seen.held - {port})
        sign = -1 if held else 1
        for key, p in list(self.used):
            if p == port and key[0] == netns and key[1] == "tcp":
                _add(self._n_used, key, sign)
                tw = self.used_tw.get((key, p))
                if tw:
                    _add(self._n_tw, key, sign * tw)

    # ---- what the views and metrics read ---------------------------------------------------

    def listener_connections(self, listeners: Iterable[SockRow]) -> dict[int, int]:
        """Established (not TIME-WAIT) connections each TCP listener accepted, by its
        cookie: those on its exact address, and for a wildcard listener those no exact
        listener on the same port takes (demux.listener_order)."""
        by_port: dict[tuple[int, int], list[SockRow]] = {}
        for r in listeners:
            if r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN:
                by_port.setdefault((r.netns, r.local_port), []).append(r)
        out: dict[int, int] = {}
        for port, group in by_port.items():
            conns = self.accepted.get(port)
            if not conns:
                continue
            exact = {(r.family, r.local_address): r.cookie for r in group}
            for (fam, addr), n in conns.items():
                for cand in listener_order(fam, addr):
                    owner = exact.get(cand)
                    if owner is not None:
                        out[owner] = out.get(owner, 0) + n
                        break
        return out

    def namespace_summary(self, ranges: Mapping[int, ports.PortRange]) -> list[dict]:
        """Per namespace: distinct ephemeral ports in use (any protocol) against the
        range; counted as ports come and go, recounted only when a range changes."""
        default = ports.PortRange(*ports.DEFAULT_RANGE)
        self._ranges = ranges
        out = []
        for netns in sorted(set(self.ns_ports) | set(ranges)):
            rng = ranges.get(netns, default)
            cached = self._ns_in_range.get(netns)
            if cached is None or cached[0] != rng:
                in_range = sum(1 for p in self.ns_ports.get(netns, ()) if rng.contains(p))
                cached = self._ns_in_range[netns] = (rng, in_range)
            out.append({"netns": netns, "in_use": cached[1], "available": rng.size,
                        "range": [rng.low, rng.high], "reserved": len(rng.reserved),
                        "classes": ports.classes(rng)})  # fmt: skip
        for gone in self._ns_in_range.keys() - self.ns_ports.keys() - ranges.keys():
            del self._ns_in_range[gone]
        return out

    def pressure(self, ranges: Mapping[int, ports.PortRange], top: int | None = None) -> list[dict]:
        """Ephemeral-port use per destination (TCP) and per local address (UDP), worst
        first (ports.py says what runs out and why). Counted as ports come and go; a
        namespace's keys are recounted only when its range or listeners changed."""
        default = ports.PortRange(*ports.DEFAULT_RANGE)
        self._ranges = ranges
        for netns in list(self._ns_seen):
            rng = ranges.get(netns, default)
            if self._ns_seen[netns].range != rng:  # a sysctl changed: recount the namespace
                self._recount(netns, rng)
        for gone in self._ns_seen.keys() - self.ns_ports.keys():  # (no socket left there)
            del self._ns_seen[gone]
        entries = []
        for key, used in self._n_used.items():
            seen = self._ns_seen[key[0]]
            available = seen.range.size - (len(seen.held) if key[1] == "tcp" else 0)
            entries.append(ports.entry(key, used, self._n_tw.get(key, 0), available))
        if top is not None:
            return heapq.nsmallest(top, entries, key=_worst_first)
        return sorted(entries, key=_worst_first)

    def _recount(self, netns: int, rng: ports.PortRange) -> None:
        """A namespace's port use under a new range, from its rows as they are now."""
        for table in (self.used, self.used_tw):
            for kp in [kp for kp in table if kp[0][0] == netns]:
                del table[kp]
        for keyed in (self._ports_of, self._key_objs, self._n_used, self._n_tw):
            for key in [k for k in keyed if k[0] == netns]:
                del keyed[key]
        self._keys_in_ns.pop(netns, None)
        self._ns_seen[netns] = PortsSeen(rng, frozenset(p for p in self.tcp_held.get(netns, ()) if rng.contains(p)))
        for r in self._source():
            if r.netns == netns and (s := shape(r)) is not None:
                self._use_of(s, 1)


class PortsSeen(NamedTuple):
    """What a namespace's pressure figures are counted under: its range, and the ports
    in it that TCP listeners hold."""

    range: ports.PortRange
    held: frozenset[int]

    def ephemeral(self, key: tuple, port: int) -> bool:
        """Does this port count toward the key's pressure? TCP: not a listener's port (a
        connect() cannot take it, and accepted connections use no ephemeral port)."""
        return self.range.contains(port) and (key[1] != "tcp" or port not in self.held)


def _flat(table: Counter, key: object, n: int) -> int:
    """Add n to table[key]; returns 1 if key appeared, -1 if it went, else 0."""
    before = table.get(key, 0)
    after = before + n
    if after > 0:
        table[key] = after
    else:
        table.pop(key, None)
    return (after > 0) - (before > 0)


def _add(table: dict, key: tuple, n: int) -> None:
    v = table.get(key, 0) + n
    if v:
        table[key] = v
    else:
        del table[key]


def _worst_first(d: dict) -> tuple:
    return (-d["percent"], -d["used"], d["netns"], d["protocol"], d["local_address"])


def ports_report(rows: Iterable[SockRow], ranges: Mapping[int, ports.PortRange]) -> dict:
    """`sockwatch ports` for a set of rows (a filtered query builds its own tally)."""
    t = Tally.of(rows)
    return {"namespaces": t.namespace_summary(ranges), "pressure": t.pressure(ranges)}
