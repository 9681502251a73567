"""The table itself: its rows, their indexes (by IP and port, listeners), the order,
the change log and the tally that views read, and the one way rows leave it. Every
other room of the table changes rows through what this keeps."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from sockwatch import containers, demux
from sockwatch import events as ev
from sockwatch.changelog import ChangeLog
from sockwatch.events import Event
from sockwatch.filters import Filters
from sockwatch.kernel.netns import NamespaceRegistry
from sockwatch.model import (
    IPPROTO_TCP,
    SockRow,
    TcpState,
)
from sockwatch.order import SortedRows
from sockwatch.tally import Shape, Tally, shape

log = logging.getLogger(__name__)

TALLY_CHANGES_KEPT = 262_144  # past this (and the table's size), the tally is dropped and recounted when asked


@dataclass
class Stats:
    events: Counter = field(default_factory=Counter)  # by kind
    coalesced: int = 0  # events of sockets born and gone within one batch: never tabled
    connection_syncs: int = 0  # connection tables read from the kernel for a view
    connection_sync_s: float = 0.0  # the last one's duration
    repairs: Counter = field(default_factory=Counter)  # reconcile fixes, by kind
    expired: int = 0  # TIME-WAIT rows the kernel let go (expected, not a repair)
    reconciles: int = 0
    resolves: int = 0
    resyncs: int = 0
    unresolved: int = 0
    unknown_netns: int = 0  # events dropped: their namespace was gone before we could name it
    owners_moved: int = 0  # sockets whose owner no longer held them (fork, SCM_RIGHTS), found by reconcile
    namespaces_gone: int = 0  # namespaces that died while we ran (their rows went with them)
    autobound_udp: int = 0  # UDP sockets a read found with no event: bound by a send (or an event lost)
    kernel_reads: int = 0  # UDP and listener tables read at a query (read_unhooked)
    binds: Counter = field(default_factory=Counter)  # (protocol, port asked, 0: any) -> successful bind() calls
    bind_failures: Counter = field(default_factory=Counter)  # (protocol, port, errno name) -> failed bind() calls
    last_reconcile_s: float = 0.0
    last_reconcile_at: float = field(default_factory=time.monotonic)  # the bootstrap counts as one
    repaired_cookies: deque = field(default_factory=lambda: deque(maxlen=4096))

    def as_dict(self) -> dict:
        return {
            "events": {ev.KIND_NAMES.get(k, str(k)): n for k, n in self.events.items()},
            "coalesced": self.coalesced,
            "connection_syncs": self.connection_syncs,
            "last_connection_sync_seconds": round(self.connection_sync_s, 4),
            "repairs": dict(self.repairs),
            "timewait_expired": self.expired,
            "reconciles": self.reconciles,
            "resolves": self.resolves,
            "resyncs": self.resyncs,
            "unresolved": self.unresolved,
            "unknown_netns": self.unknown_netns,
            "namespaces_gone": self.namespaces_gone,
            "owners_moved": self.owners_moved,
            "autobound_udp": self.autobound_udp,
            "kernel_reads": self.kernel_reads,
            "last_reconcile_seconds": round(self.last_reconcile_s, 4),
            "repaired_cookies": list(self.repaired_cookies),
        }


class Store:
    def __init__(self, registry: NamespaceRegistry | None = None, resolver: containers.Resolver | None = None) -> None:
        self.registry = registry or NamespaceRegistry()
        self.containers = resolver or containers.Resolver()
        self.rows: dict[int, SockRow] = {}
        # cookies of the rows keyed by (IP, port): UDP sockets and TCP listeners (few; the
        # per-query kernel read compares these, not the connections)
        self._by_ip_port: set[int] = set()
        self.pending: dict[int, set[str]] = {}  # cookie -> reasons
        self.pending_tries: Counter = Counter()
        self.stats = Stats()
        self.version = 0  # bumped on every change: views cache what they built from it
        self._gen = 0  # bumped per applied batch; a row remembers the batch that last set it
        self._removed_during: set[int] | None = None  # cookies removed while a reconcile runs
        self._order = SortedRows()  # the visible rows in order, kept across changes
        # rows changed or added, for the JSON blocks and the owner rule
        self._log = ChangeLog(("json", "owners"), lambda: len(self.rows) + 4096)
        self._visible: tuple[int, list[SockRow]] = (-1, [])
        self._listeners: dict[tuple, SockRow] | None = None  # rebuilt lazily after a change
        self._tally: Tally | None = None  # whole-table aggregates, once something has asked for them
        # cookies changed since the tally last looked -> the shape it counted them under
        # (None: not counted); a row's shape is kept only while the tally has not seen its change
        self._changed: dict[int, Shape | None] = {}

    def _netns_inode(self, e: Event) -> int | None:
        ns = self.registry.resolve_cookie(e.netns_cookie, e.pid if e.has_owner else None)
        return ns.inode if ns is not None else None

    def _need(self, cookie: int, reason: str) -> None:
        self.pending.setdefault(cookie, set()).add(reason)

    def _touch(self, cookie: int) -> None:
        """A row added, or changed in what a view shows."""
        self._log.mark(cookie)

    def take_touched(self) -> set[int] | None:
        """Cookies of the rows added or changed since the last call (None: any may have),
        for a view that keeps what it rendered of each row."""
        return self._log.take("json")

    def _remove(self, cookie: int) -> bool:
        row = self.rows.pop(cookie, None)
        self._by_ip_port.discard(cookie)
        self.pending.pop(cookie, None)
        self.pending_tries.pop(cookie, None)
        if row is None:
            return False
        self._changed.setdefault(cookie, shape(row))
        self._order.remove(row)
        if row.state == TcpState.LISTEN:
            self._listeners = None
        if self._removed_during is not None:
            self._removed_during.add(cookie)
        self.version += 1
        return True

    def netns_inode(self, e: Event) -> int | None:
        """The inode of a record's namespace, or None if it is gone unseen."""
        return self._netns_inode(e)

    def listener_of(self, netns: int, family: int, address: demux.Address, port: int) -> SockRow | None:
        """The owned listener an accepted connection to (address, port) came through, in
        the kernel's order (demux.listener_order: the one lookup rule)."""
        if self._listeners is None:  # one pass after listeners changed, not one per accept
            self._listeners = {}
            for r in self.rows.values():
                if r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN and r.pid is not None:
                    self._listeners.setdefault((r.netns, r.family, r.local_address, r.local_port), r)
        listeners = self._listeners
        for fam, addr in demux.listener_order(family, address):
            lst = listeners.get((netns, fam, addr, port))
            if lst is not None:
                return lst
        return None

    def visible(self) -> list[SockRow]:
        """Visible rows in no order, one pass per table version (views that sort or
        count for themselves: sorting 100,000 rows for each screenful is wasted)."""
        version, rows = self._visible
        if version != self.version:
            rows = [r for r in self.rows.values() if r.visible]
            self._visible = (self.version, rows)
        return rows

    def keyed_by_ip_port(self) -> list[SockRow]:
        """The visible UDP sockets and TCP listeners (few: no pass over the connections)."""
        rows = self.rows
        return [r for c in self._by_ip_port if (r := rows[c]).visible]

    def tally(self) -> Tally:
        """The whole-table aggregates, brought up to date with the rows changed since the
        last call (a recount after a bootstrap, or when nobody asked for a long time)."""
        if self._tally is None:
            self._changed.clear()
            self._tally = Tally.of(self.rows.values(), source=self.rows.values)
        elif self._changed:
            rows, update = self.rows, self._tally.update
            for c, was in self._changed.items():
                update(c, was, rows.get(c))
            self._changed.clear()
        return self._tally

    def ordered(self) -> tuple[list[SockRow], list[int], bytearray]:
        """The visible rows in order, their cookies and marks (order.MARK_EVERY), as kept
        (to read, not to change)."""
        rows = self._order.rows(self.visible)
        return rows, self._order.cookies(), self._order.marks()

    def snapshot(self, filters: Filters | None = None) -> list[SockRow]:
        """Visible rows in the kernel's grouping; sorted once per table version."""
        ordered = self._order.rows(self.visible)
        if filters is None or filters.empty:
            return list(ordered)
        return [r for r in ordered if filters.match(r)]
