"""The one owner of the socket table. Data flows one way into it (bootstrap dump, hook
events, kernel reads when a view asks, reconcile) and out of it to the views.

Two kinds of rows, kept two ways:
- what receives packets by (IP, port) — TCP listeners, UDP sockets — from hook events as
  they happen (they are few, and a bind or a listen is news);
- TCP connections (every TCP state but LISTEN, TIME-WAIT included) from the kernel's own
  table when a view asks (`sync_connections`): one sock_diag dump per namespace, joined
  with the owners connect() left in the hooks' owner logs (bpf/udp.bpf.c), and only when
  the hooks' generation counter moved or a TIME-WAIT row is due. A connection costs no
  Python work at all until then; its records reach the agent only while someone
  streams them.

What hooks cannot see is read from the kernel when a view asks, not per event: a
socket's inode, the local side the kernel chose for a connected or autobound UDP
socket, and sockets from before sockwatch started.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import NamedTuple

from sockwatch import containers, demux, ports
from sockwatch import events as ev
from sockwatch.changelog import ChangeLog
from sockwatch.containers import Container
from sockwatch.events import Event
from sockwatch.filters import Filters
from sockwatch.kernel import procscan, sockdiag
from sockwatch.kernel.netns import Namespace, NamespaceGone, NamespaceRegistry, device_names, in_netns
from sockwatch.model import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    OWNER_HOOK,
    OWNER_LISTENER,
    OWNER_PROC,
    R_ACTIVE,
    SockRow,
    TcpState,
    sort_key,
)
from sockwatch.order import SortedRows
from sockwatch.tally import Shape, Tally, shape

log = logging.getLogger(__name__)

# Why a row waits for a sock_diag read (done when a view asks, or at reconcile).
NEED_INODE = "inode"  # not read yet
NEED_TUPLE = "tuple"  # connected UDP: the kernel chose the local side
NEED_ORPHAN = "orphan"  # a released listener without state callbacks (from before start)

MAX_BIND_KEYS = 1000  # (protocol, port[, errno]) kept for the metrics, each
PORT_RANGE_SECONDS = 10.0  # how long a namespace's ip_local_port_range is taken as read
MAX_BOUND_OWNERS = 4096
OWNER_SCAN_SECONDS = 5.0  # at most one /proc scan this often for owners that exited
CONNECTION_STATES = sockdiag.ALL_STATES & ~sockdiag.LISTEN_ONLY  # what sync_connections reads
TALLY_CHANGES_KEPT = 262_144  # past this (and the table's size), the tally is dropped and recounted when asked

# SockRow.flags, the tracker's own bookkeeping
R_RELEASED = 0x01  # no file holds it (a TCP orphan lives on until CLOSE)
R_NO_CALLBACKS = 0x02  # from before sockwatch: no state callbacks will tell its end


class Change(NamedTuple):
    """What one applied event did to the table: 'add', 'update' or 'remove'."""

    op: str
    cookie: int


def is_connection_row(r: SockRow) -> bool:
    """A row sync_connections keeps (every TCP state but LISTEN)."""
    return r.protocol == IPPROTO_TCP and r.state != TcpState.LISTEN


def is_connection_event(e: Event, old: SockRow | None) -> bool:
    """A record about a TCP connection: the stream's alone (the table reads connections
    from the kernel). Listens and a listener's end stay the table's."""
    if e.protocol != IPPROTO_TCP or e.kind in (ev.LISTEN, ev.BIND, ev.BIND_FAIL):
        return False
    if e.kind == ev.STATE:
        return e.old_state != TcpState.LISTEN
    if e.kind == ev.RELEASE:
        return old is None or old.state != TcpState.LISTEN
    return True  # connect, accept


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


def row_from_diag(d: sockdiag.DiagSock, ns: Namespace, unnamed: set[int] | None = None) -> SockRow:
    """A row as the kernel has the socket; `unnamed` collects it if it is bound to a device."""
    if d.bound_dev and unnamed is not None:
        unnamed.add(d.cookie)
    connected = d.remote_port != 0
    return SockRow(
        cookie=d.cookie,
        protocol=d.protocol,
        family=d.family,
        state=d.state,
        local_address=d.local_address,
        local_port=d.local_port,
        remote_address=d.remote_address if connected else None,
        remote_port=d.remote_port,
        netns=ns.inode,
        inode=d.inode,
        uid=d.uid,
        netns_cookie=ns.cookie,
        bound_dev=d.bound_dev,
    )


def row_from_event(e: Event, netns: int) -> SockRow:
    d = ev.decode(e)
    pid, uid, comm = d.owner or (None, None, None)
    return SockRow(
        cookie=e.cookie,
        protocol=e.protocol,
        family=d.family,
        state=e.state,
        local_address=d.local,
        local_port=e.local_port,
        remote_address=d.remote,
        remote_port=e.remote_port,
        netns=netns,
        pid=pid,
        uid=uid,
        comm=comm,
        owner_source=OWNER_HOOK if d.owner else None,
        netns_cookie=e.netns_cookie,
        flags=R_ACTIVE if e.kind == ev.CONNECT else 0,
        born_ns=e.ts_ns,
    )


def _names_inside(indexes: set[int], ns_fd: int) -> dict[int, str]:
    return in_netns(ns_fd, functools.partial(device_names, indexes))


class Tracker:
    def __init__(self, registry: NamespaceRegistry | None = None, resolver: containers.Resolver | None = None) -> None:
        self.registry = registry or NamespaceRegistry()
        self.containers = resolver or containers.Resolver()
        self.rows: dict[int, SockRow] = {}
        # cookies of the rows keyed by (IP, port): UDP sockets and TCP listeners (few; the
        # per-query kernel read compares these, not the connections)
        self._by_ip_port: set[int] = set()
        self._unnamed: set[int] | None = None  # rows that may be bound to a device not yet named (None: all)
        self.pending: dict[int, set[str]] = {}  # cookie -> reasons
        self.pending_tries: Counter = Counter()
        self.stats = Stats()
        self.version = 0  # bumped on every change: views cache what they built from it
        self._gen = 0  # bumped per applied batch; a row remembers the batch that last set it
        self._removed_during: set[int] | None = None  # cookies removed while a reconcile runs
        self._order = SortedRows()  # the visible rows in order, kept across changes
        # rows changed or added, for the JSON blocks and the owner rule
        self._log = ChangeLog(("json", "owners"), lambda: len(self.rows) + 4096)
        self._connection_keys: set[bytes] | None = None  # what the last connection read saw (None: read whole)
        self._visible: tuple[int, list[SockRow]] = (-1, [])
        self._listeners: dict[tuple, SockRow] | None = None  # rebuilt lazily after a change
        # Set where sockops cannot read the task (before 6.2): TCP sockets bound but not
        # yet listening or connecting -> their binder, for the listen/connect record
        self.owners_from_binds = False
        self._bound_owner: dict[int, tuple[int, int, str]] = {}
        self._last_owner_scan = -OWNER_SCAN_SECONDS
        self._owner_scan_due = False  # an owner was found gone: its rows want a /proc scan
        self._owner_sought: set[int] = set()  # ownerless rows already looked for in /proc
        # what the last whole-table owner pass left: (table version, pid -> name, container)
        self._owners_checked: dict[int, tuple[str, Container | None]] = {}
        self._owners_at_whole_pass = 0  # how many owners the last whole pass named
        # what sync_connections last read: the hooks' generation then, and the moment its
        # first TIME-WAIT row ends (no hook sees a TIME-WAIT end: the clock does)
        self._synced_generation: int | None = None
        self._timewait_next = math.inf
        # cookie -> pid of recent TCP connect()s (the hooks' owner logs), read by a sync that finds new rows
        self.recent_owners: Callable[[], dict[int, int]] = dict
        self._port_ranges: dict[int, tuple[float, ports.PortRange]] = {}  # netns cookie -> (read at, range)
        self._tally: Tally | None = None  # whole-table aggregates, once something has asked for them
        # cookies changed since the tally last looked -> the shape it counted them under
        # (None: not counted); a row's shape is kept only while the tally has not seen its change
        self._changed: dict[int, Shape | None] = {}

    # ---- reading the kernel's own tables -------------------------------------------------

    def _dump(
        self,
        ns: Namespace,
        protocols: tuple[int, ...] = (IPPROTO_TCP, IPPROTO_UDP),
        states: int = sockdiag.ALL_STATES,
    ) -> list[sockdiag.DiagSock]:
        try:
            with self.registry.reading():
                return sockdiag.dump_all(self.registry.diag(ns), protocols, states)
        except NamespaceGone:
            return []
        except OSError as e:
            log.warning("sock_diag in netns %s failed: %s", ns.inode, e)
            return []

    def _fill_owners(self, rows: Iterable[SockRow]) -> None:
        """One /proc scan for rows no hook attributed."""
        need = {r.inode: r for r in rows if r.pid is None and r.inode}
        if not need:
            return
        owners = procscan.scan(set(need))
        for ino, row in need.items():
            o = owners.get(ino)
            if o is not None:
                row.pid, row.comm, row.owner_source = o.pid, o.comm, OWNER_PROC
                row.container = self.containers.of_pid(o.pid)
                self._touch(row.cookie)

    def bootstrap(self) -> None:
        """The table as the kernel has it now. With hooks attached before, the events
        applied after this fill in owners and everything that changed meanwhile."""
        self.registry.refresh()
        with self.registry.reading():
            dumps = [(ns, self._dump(ns)) for ns in list(self.registry.by_cookie.values())]
        for ns, diags in dumps:
            for d in diags:
                row = row_from_diag(d, ns, self._unnamed)
                if row.protocol == IPPROTO_TCP:
                    row.flags |= R_NO_CALLBACKS
                self.rows[row.cookie] = row
        self._by_ip_port = {c for c, r in self.rows.items() if not is_connection_row(r)}
        self._unnamed = None  # every row is looked at once
        self._listeners = None
        self._tally = None
        self._order.break_order()
        self._log.everything()
        self._connection_keys = None
        self.version += 1

    def fill_owners(self) -> None:
        """Owners for rows no hook named: one /proc scan (sockets from before start), then
        listeners' owners for connections still in an accept queue (no file yet)."""
        need = [r for r in self.rows.values() if r.pid is None]
        self._fill_owners(need)
        self._listeners = None  # listeners may have just got theirs
        self._inherit_listener_owners(need)
        self.version += 1

    # ---- hook events ---------------------------------------------------------------------

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

    def apply_batch(self, batch: ev.EventBatch | Sequence[Event]) -> list[Change]:
        """Apply events in order and return what changed. A socket that is born and gone
        within the batch (the common case under churn) is never tabled at all; its
        records are recognised from the batch's columns and never decoded."""
        if not isinstance(batch, ev.EventBatch):
            batch = ev.EventBatch.of(batch)
        n = len(batch)
        if not n:
            return []
        self._gen += 1
        self.stats.events.update(batch.kinds)
        kinds = batch.kinds
        if ev.BIND in kinds or ev.BIND_FAIL in kinds:  # a C-level scan; binds are rare next to churn
            self._count_binds(batch)
        cookies = batch.cookies
        last = dict(zip(cookies, range(n), strict=True))  # each cookie's last record
        ends = batch.ends()
        gone = set(compress(last.keys(), map(ends.__getitem__, last.values())))
        rows = self.rows
        gone = {c for c in gone if c not in rows}  # not `gone -= rows.keys()`: that walks the whole table
        if gone:
            if self._removed_during is not None:
                self._removed_during |= gone  # a reconcile's dump may have seen them alive
            keep = last.keys() - gone
            todo: Iterable[int] = compress(range(n), map(keep.__contains__, cookies))
        else:
            todo = range(n)
        changes: list[Change] = []
        applied = 0
        event = batch.event
        for i in todo:
            applied += 1
            ch = self._apply(event(i))
            if ch is not None:
                changes.append(ch)
        self.stats.coalesced += n - applied
        if len(self._changed) > TALLY_CHANGES_KEPT and len(self._changed) > len(rows):
            self._changed.clear()  # nobody has looked for a while: a recount costs no more, and this is memory
            self._tally = None
        return changes

    def _count_binds(self, batch: ev.EventBatch) -> None:
        """bind() outcomes for the metrics, from every record (a socket born and gone
        within a batch is never tabled, but its bind counts): by protocol and the port
        bind() asked for (0: the kernel chose), failures also by errno. Keys are capped:
        past MAX_BIND_KEYS, new ports count under port -1 ("other")."""
        st = self.stats
        for i, k in enumerate(batch.kinds):
            if k not in (ev.BIND, ev.BIND_FAIL):
                continue
            e = batch.event(i)
            port = e.local_port if e.flags & ev.F_PORT_ASKED else 0
            if k == ev.BIND:
                key2 = (e.protocol, port)
                if key2 not in st.binds and len(st.binds) >= MAX_BIND_KEYS:
                    key2 = (e.protocol, -1)
                st.binds[key2] += 1
            else:
                key3 = (e.protocol, e.local_port, errno.errorcode.get(e.err, str(e.err)))
                if key3 not in st.bind_failures and len(st.bind_failures) >= MAX_BIND_KEYS:
                    key3 = (e.protocol, -1, key3[2])
                st.bind_failures[key3] += 1

    def apply(self, e: Event) -> Change | None:
        """One event (tests and tools; the agent applies batches)."""
        changes = self.apply_batch([e])
        return changes[0] if changes else None

    def _apply(self, e: Event) -> Change | None:
        cookie = e.cookie
        old = self.rows.get(cookie)
        kind = e.kind
        if e.state == TcpState.LISTEN or (old is not None and old.state == TcpState.LISTEN):
            self._listeners = None

        if kind == ev.BIND and e.protocol == IPPROTO_TCP and e.has_owner and self.owners_from_binds:
            if len(self._bound_owner) >= MAX_BOUND_OWNERS:
                del self._bound_owner[next(iter(self._bound_owner))]  # bound long ago, never used
            self._bound_owner[cookie] = (e.pid, e.uid, ev.comm_text(e.comm))
        if kind == ev.BIND_FAIL or (kind == ev.BIND and (e.protocol == IPPROTO_TCP or not e.local_port)):
            return None  # for the event stream: a bound TCP socket (or no port yet) is in no lookup table

        if kind == ev.RELEASE:
            self._bound_owner.pop(cookie, None)
        if is_connection_event(e, old):
            return None  # the stream's: connections are read from the kernel (sync_connections)

        if kind == ev.RELEASE:
            if old is None:
                return None
            if ev.ends_socket(e):
                return Change("remove", cookie) if self._remove(cookie) else None
            old.flags |= R_RELEASED
            # Only a row from a dump lacks state callbacks. The hook's prestart flag is a
            # cookie bound, and cookies are handed out per CPU in batches, not in order:
            # a socket made after start on another CPU can fall under it.
            if old.flags & R_NO_CALLBACKS:
                self._need(cookie, NEED_ORPHAN)  # no state callbacks: only the kernel knows its end
            return None

        if kind == ev.STATE:  # a listener's end (the only state change the table takes)
            return Change("remove", cookie) if self._remove(cookie) else None

        netns = old.netns if old is not None else self._netns_inode(e)
        if netns is None:
            self.stats.unknown_netns += 1
            return None
        row = row_from_event(e, netns)
        row.gen = self._gen
        if kind == ev.LISTEN and (binder := self._bound_owner.pop(cookie, None)) and row.pid is None:
            row.pid, row.uid, row.comm = binder
            row.owner_source = OWNER_HOOK
        if old is not None:
            # keep what the event cannot know
            row.inode = old.inode
            row.born_ns = old.born_ns or row.born_ns
            row.flags |= old.flags & ~R_NO_CALLBACKS
            if row.pid is None:
                row.pid, row.uid, row.comm, row.owner_source = old.pid, old.uid, old.comm, old.owner_source
            if row.pid == old.pid:
                row.container = old.container
            if kind == ev.UDP_CONNECT:
                row.local_address, row.local_port = old.local_address, old.local_port
        if kind == ev.UDP_CONNECT:
            self._need(cookie, NEED_TUPLE)
        self._changed.setdefault(cookie, shape(old) if old is not None else None)
        if old is not None:
            self._order.remove(old)
        self.rows[cookie] = row
        self._order.add(row)
        self._touch(cookie)
        self._by_ip_port.add(cookie)  # (events keep no connection rows)
        if row.visible and not row.inode:
            self._need(cookie, NEED_INODE)
        self.version += 1
        return Change("update" if old is not None else "add", cookie)

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

    def _inherit_listener_owners(self, rows: Iterable[SockRow]) -> None:
        """An accepted connection belongs to whoever holds its listener."""
        for r in rows:
            if r.pid is None and r.protocol == IPPROTO_TCP and r.is_connection:
                lst = self.listener_of(r.netns, r.family, r.local_address, r.local_port)
                if lst is not None:
                    r.pid, r.uid, r.comm, r.owner_source = lst.pid, lst.uid, lst.comm, OWNER_LISTENER
                    r.container = lst.container
                    self._touch(r.cookie)

    # ---- reading the kernel for what hooks cannot see ---------------------------------------

    def resolve_pending(self, max_tries: int = 5) -> int:
        """Read from the kernel what waiting rows need, as cheaply as the kernel allows:
        listeners from the listener hash only, UDP with one dump per namespace."""
        if not self.pending:
            return 0
        groups: dict[tuple[int, int], list[int]] = {}
        for cookie in list(self.pending):
            row = self.rows.get(cookie)
            if row is None or not self.pending[cookie]:
                self.pending.pop(cookie, None)
                continue
            groups.setdefault((row.netns_cookie, row.protocol), []).append(cookie)
        with self.registry.reading():
            return self._resolve_groups(groups, max_tries)

    def _resolve_groups(self, groups: dict[tuple[int, int], list[int]], max_tries: int) -> int:
        fixed = 0
        for (netns_cookie, proto), cookies in groups.items():
            ns = self.registry.by_cookie.get(netns_cookie)
            if ns is None:
                for c in cookies:
                    self._remove(c)
                continue
            # listeners and UDP sockets (connections are synced whole)
            only_listeners = proto == IPPROTO_TCP and all(self.rows[c].state == TcpState.LISTEN for c in cookies)
            states = sockdiag.LISTEN_ONLY if only_listeners else sockdiag.ALL_STATES
            kernel = {d.cookie: d for d in self._dump(ns, (proto,), states)}
            self.stats.resolves += 1
            for c in cookies:
                d = kernel.get(c)
                row = self.rows[c]
                reasons = self.pending.get(c, set())
                if d is None:
                    if NEED_ORPHAN in reasons:
                        self._remove(c)  # it is gone from the kernel too
                        fixed += 1
                        continue
                    self.pending_tries[c] += 1
                    if self.pending_tries[c] >= max_tries:
                        self.stats.unresolved += 1
                        self.pending.pop(c, None)
                        self.pending_tries.pop(c, None)
                    continue
                self._take_kernel_fields(row, d)
                self.pending_tries.pop(c, None)
                self.pending.pop(c, None)
                fixed += 1
        if fixed:
            self.version += 1
            self._listeners = None
        return fixed

    def _take_kernel_fields(self, row: SockRow, d: sockdiag.DiagSock) -> bool:
        """Copy state/addresses/inode from the kernel; True if anything but the inode differed."""
        self._changed.setdefault(row.cookie, shape(row))  # before it changes
        key, was_visible = sort_key(row), row.visible
        connected = d.remote_port != 0
        remote = d.remote_address if connected else None
        changed = (
            row.state != d.state
            or row.local_address != d.local_address
            or row.local_port != d.local_port
            or row.remote_address != remote
            or row.remote_port != d.remote_port
            or row.bound_dev != d.bound_dev
        )
        if row.bound_dev != d.bound_dev:
            row.bound_dev, row.device = d.bound_dev, None  # named again (name_devices)
            if self._unnamed is not None:
                self._unnamed.add(row.cookie)
        row.state = d.state
        row.local_address, row.local_port = d.local_address, d.local_port
        row.remote_address, row.remote_port = remote, d.remote_port
        row.inode = d.inode
        if row.uid is None:
            row.uid = d.uid
        self._order.changed(row, key, was_visible)
        self._touch(row.cookie)
        return changed

    def _rows_by_owner(self, rows: Iterable[SockRow] | None = None) -> dict[int, list[SockRow]]:
        by_pid: dict[int, list[SockRow]] = {}
        for r in self.rows.values() if rows is None else rows:
            if r.pid is not None:
                by_pid.setdefault(r.pid, []).append(r)
        return by_pid

    def fix_owners(self, rows: Iterable[SockRow] | None = None) -> int:
        """The owner rule, applied when a view asks. A socket's owner is a process holding
        its file, named by its process name (/proc/PID/comm of the process, as ss prints
        it, not the thread that made the socket); a socket with no file (TIME-WAIT) has
        none. Hooks name the creator: this renames owners that changed their name and,
        for owners that exited (the file was inherited by a fork or passed with
        SCM_RIGHTS), finds who holds it now with one /proc scan (at most every few
        seconds; until then the row says no owner). `rows`: only these (a screenful),
        else every row. Returns how many rows changed."""
        changed = 0
        lost: list[SockRow] = []
        of_pid, now = self.containers.of_pid, time.monotonic()
        whole = rows is None
        since: set[int] | None = None
        if whole:
            since = self._log.take("owners")
            if since is not None and self._owners_unchanged(now):
                if not since:
                    return 0
                # every owner named before is as it was: only rows new or changed since need the rule
                rows = [r for c in since if (r := self.rows.get(c)) is not None]
                whole = False
        applied: dict[int, tuple[str, Container | None]] = {}
        for pid, owned in self._rows_by_owner(rows).items():
            name = procscan.process_name(pid)
            c = of_pid(pid, now) if name is not None else None  # the owner's container, read once per pid
            if name is not None:
                applied[pid] = (name, c)
            for r in owned:
                if name is None or r.state == TcpState.TIME_WAIT:
                    r.pid = r.comm = r.owner_source = r.container = None
                    if r.inode and r.state != TcpState.TIME_WAIT:
                        lost.append(r)
                elif r.comm == name and (r.container is c or r.container == c):
                    continue
                else:
                    r.comm, r.container = name, c
                self._touch(r.cookie)
                changed += 1
        self._owner_scan_due |= bool(lost)
        # rows no hook named (a kernel whose sockops cannot read the task): looked for at
        # once the first time, then with the owners that exited
        ownerless = [r for r in (self.rows.values() if rows is None else rows)
                     if r.pid is None and r.visible and r.state != TcpState.TIME_WAIT]  # fmt: skip
        fresh = [r for r in ownerless if r.inode and r.cookie not in self._owner_sought]
        if fresh:
            if len(self._owner_sought) > 1 << 17:
                self._owner_sought.clear()
            self._owner_sought.update(r.cookie for r in fresh)
            self._owner_scan_due, self._last_owner_scan = True, -OWNER_SCAN_SECONDS
        if self._owner_scan_due and now - self._last_owner_scan >= OWNER_SCAN_SECONDS:
            self._owner_scan_due = False  # until another owner is found gone
            self._last_owner_scan = now
            self._fill_owners([r for r in self.rows.values() if r.pid is None and r.inode and r.visible])
            self._listeners = None  # listeners may have just got theirs
            changed += 1
        if ownerless:  # connections in an accept queue (no file yet) are their listener's
            self._inherit_listener_owners(ownerless)
            changed += sum(1 for r in ownerless if r.pid is not None)
        if changed:
            self.version += 1
        if whole:
            self._owners_checked, self._owners_at_whole_pass = applied, len(applied)
        elif since is not None:
            self._owners_checked.update(applied)
        return changed

    def _owners_unchanged(self, now: float) -> bool:
        """Whether every owner the rule named (since the last whole pass) still runs
        under the same name in the same container, and no /proc scan is due: then only
        rows new or changed since need the rule. One read per owner, not per row. An
        owner list grown well past what the last whole pass named (owners come and go)
        asks for a whole pass, which forgets the gone."""
        applied = self._owners_checked
        if self._owner_scan_due and now - self._last_owner_scan >= OWNER_SCAN_SECONDS:
            return False
        if len(applied) > 2 * self._owners_at_whole_pass + 64:
            return False
        of_pid = self.containers.of_pid
        for pid, (name, c) in applied.items():
            if procscan.process_name(pid) != name:
                return False
            got = of_pid(pid, now)
            if got is not c and got != c:
                return False
        return True

    def verify_holders(self) -> int:
        """Owners that still run but no longer hold the socket (they passed it with
        SCM_RIGHTS, or forked and closed it): one read of each owner's fd table, then
        one /proc scan for the rows it did not hold. O(open files): run by reconcile,
        whose interval stretches with what it costs. Returns how many rows moved."""
        lost = []
        for pid, rows in self._rows_by_owner().items():
            held = procscan.socket_inodes(pid)
            lost += [r for r in rows if r.inode and (held is None or r.inode not in held)]
        for r in lost:
            r.pid = r.comm = r.owner_source = r.container = None
            self._touch(r.cookie)
        if lost:
            self._fill_owners(lost)
            self._listeners = None
            self.version += 1
        return len(lost)

    def forget_dead_namespaces(self) -> int:
        """Drop the rows of namespaces that died (the registry checks each cheaply)."""
        gone = {ns.cookie for ns in self.registry.check_alive()}
        if not gone:
            return 0
        dead = [c for c, r in self.rows.items() if r.netns_cookie in gone]
        for c in dead:
            self._remove(c)
        self.stats.namespaces_gone += len(gone)
        return len(dead)

    def read_unhooked(self, drain: Callable[[], object] = lambda: None) -> list[SockRow]:
        """UDP sockets and TCP listeners as the kernel has them now, read when a view asks
        (one sock_diag dump of each per namespace: the hook that would see them close runs
        for every socket, so it is attached only while someone streams). Bind and connect
        events keep their owners and the stream; this read is the table's truth for what
        they cannot see: a sendto() that bound a port, a close, a disconnect. Rows it adds
        have no owner until fix_owners looks in /proc (as ss -p does). `drain` applies
        the events that arrived during the dump first (see reconcile). Returns the rows
        added."""
        gen0 = self._gen
        self._removed_during = set()
        kernel: dict[int, tuple[sockdiag.DiagSock, Namespace]] = {}
        unread: set[int] = set()  # namespaces whose table could not be read: their rows stay
        try:
            with self.registry.reading():
                for ns in list(self.registry.by_cookie.values()):
                    try:
                        diag = self.registry.diag(ns)
                        dumps = (sockdiag.dump_all(diag, (IPPROTO_UDP,), sockdiag.ALL_STATES),
                                 sockdiag.dump_all(diag, (IPPROTO_TCP,), sockdiag.LISTEN_ONLY))  # fmt: skip
                    except NamespaceGone:
                        continue  # forget_dead_namespaces takes its rows
                    except OSError as e:
                        log.warning("sock_diag in netns %s failed: %s", ns.inode, e)
                        unread.add(ns.cookie)
                        continue
                    for dump in dumps:
                        for d in dump:
                            kernel[d.cookie] = (d, ns)
            drain()
            removed_meanwhile = self._removed_during
        finally:
            self._removed_during = None
        rows = self.rows
        added: list[SockRow] = []
        changed = 0
        for cookie, (d, ns) in kernel.items():
            row = rows.get(cookie)
            if row is None:
                if cookie in removed_meanwhile:
                    continue  # closed while we were dumping
                row = rows[cookie] = row_from_diag(d, ns, self._unnamed)
                self._by_ip_port.add(cookie)
                self._order.add(row)
                self._touch(cookie)
                if d.protocol == IPPROTO_TCP:
                    row.flags |= R_NO_CALLBACKS  # a listen() no hook saw: its end comes from a read too
                self._changed.setdefault(cookie, None)
                added.append(row)
            elif row.gen <= gen0:
                self.pending.pop(cookie, None)
                if self._take_kernel_fields(row, d):
                    changed += 1
            elif not row.inode:
                row.inode = d.inode
                self._touch(cookie)
        gone = [
            c for c in self._by_ip_port
            if c not in kernel and (r := rows[c]).visible and r.gen <= gen0 and r.netns_cookie not in unread
            and (r.protocol == IPPROTO_UDP or r.state == TcpState.LISTEN)
        ]  # fmt: skip
        for c in gone:
            self._remove(c)
        self.stats.kernel_reads += 1
        self.stats.autobound_udp += sum(1 for r in added if r.protocol == IPPROTO_UDP and not r.is_connection)
        if added or changed or gone:
            self._listeners = None
            self.version += 1
        return added

    def reconcile(
        self,
        drain: Callable[[], object] = lambda: None,
        protocols: tuple[int, ...] = (IPPROTO_TCP, IPPROTO_UDP),
        repair: bool = True,
    ) -> dict[str, int]:
        """Compare every namespace's kernel table of `protocols` with ours, repair and
        count differences.

        `drain` applies the events that arrived during the dump before comparing: a row
        an event set after the dump began is newer than the dump, and a socket removed
        meanwhile is not mistaken for one the hooks missed. With repair=False the kernel
        is the only source for those protocols (a hook for them is missing): what it
        changes is a read, counted apart from repairs.
        """
        t0 = time.monotonic()
        gen0 = self._gen
        self._removed_during = set()
        try:
            self.registry.refresh()
            self.forget_dead_namespaces()  # neither dumped nor kept
            gone: set[int] = set()
            kernel: dict[int, tuple[sockdiag.DiagSock, Namespace]] = {}
            with self.registry.reading():
                for ns in list(self.registry.by_cookie.values()):
                    try:
                        self.registry.diag(ns)
                    except NamespaceGone:
                        gone.add(ns.cookie)
                        continue
                    for proto in protocols:  # TCP: listeners only (sync_connections keeps the rest)
                        states = sockdiag.LISTEN_ONLY if proto == IPPROTO_TCP else sockdiag.ALL_STATES
                        for d in self._dump(ns, (proto,), states):
                            kernel[d.cookie] = (d, ns)
            for c in [c for c, r in self.rows.items() if r.netns_cookie in gone]:
                self._remove(c)
            drain()
            removed_meanwhile = self._removed_during
        finally:
            self._removed_during = None
        added: list[SockRow] = []
        counts: Counter = Counter()
        fixed: list[int] = []
        for cookie, (d, ns) in kernel.items():
            row = self.rows.get(cookie)
            if row is None:
                if cookie in removed_meanwhile:
                    continue  # closed while we were dumping
                row = row_from_diag(d, ns, self._unnamed)
                self.rows[cookie] = row
                self._by_ip_port.add(cookie)  # (UDP sockets and listeners only)
                self._order.add(row)
                self._touch(cookie)
                self._changed.setdefault(cookie, None)
                added.append(row)
                counts["added"] += 1
                fixed.append(cookie)
            elif row.gen <= gen0:
                pending = self.pending.pop(cookie, None)
                # fields an event never carries are expected to differ until read
                if self._take_kernel_fields(row, d) and not pending:
                    counts["changed"] += 1
                    fixed.append(cookie)
            elif not row.inode:
                row.inode = d.inode
                self._touch(cookie)
        for cookie, row in list(self.rows.items()):
            if cookie in kernel or not row.visible or row.gen > gen0 or row.protocol not in protocols:
                continue
            if is_connection_row(row):
                continue  # sync_connections' (below)
            if self.pending.get(cookie, set()) & {NEED_ORPHAN}:
                pass  # its end was not reported by design: not a repair
            else:
                counts["removed"] += 1
                fixed.append(cookie)
            self._remove(cookie)
        for row in added:
            if row.protocol == IPPROTO_TCP:
                row.flags |= R_NO_CALLBACKS
        self._listeners = None
        self._fill_owners(added)  # (connections are not compared: sync_connections reads them whole when asked)
        self.stats.owners_moved += self.verify_holders()  # expected: no hook sees fds passed
        self.version += 1
        if repair:
            self.stats.repaired_cookies.extend(fixed)
            self.stats.repairs.update(counts)
            self.stats.reconciles += 1
            self.stats.last_reconcile_s = time.monotonic() - t0
            self.stats.last_reconcile_at = time.monotonic()
        else:
            self.stats.kernel_reads += 1
        return dict(counts)

    # ---- TCP connections, read from the kernel when a view asks -------------------------

    def connections_stale(self, generation: int | None, now: float | None = None) -> bool:
        """Whether the connection rows may differ from the kernel's: the hooks' generation
        moved since the last sync (None: not known, so yes), or a TIME-WAIT row's time is up."""
        now = time.monotonic() if now is None else now
        return generation is None or generation != self._synced_generation or now >= self._timewait_next

    def sync_connections(self, generation: int | None) -> int:
        """Every TCP connection (all states but LISTEN, TIME-WAIT included) as the kernel
        has it now, read with one sock_diag dump per namespace and joined with the owners
        of recent connect()s. Skipped when `generation` (the hooks' count of connection
        changes) has not moved and no TIME-WAIT row is due. Accepted connections take
        their listener's owner. Returns how many rows changed."""
        now = time.monotonic()
        if not self.connections_stale(generation, now):
            return 0
        t0 = now
        # Keys of the last read: only sockets whose shown fields differ are decoded. The
        # first read (and one after a reconcile, which also checks nothing drifted) is whole.
        read = sockdiag.ChangedRead(self._connection_keys if self._connection_keys is not None else frozenset())
        kernel: list[tuple[sockdiag.DiagSock, Namespace]] = []
        with self.registry.reading():
            for ns in list(self.registry.by_cookie.values()):
                at = len(read.changed)
                try:
                    sock = self.registry.diag(ns)
                    for family in (socket.AF_INET, socket.AF_INET6):
                        sockdiag.dump_changed(sock, IPPROTO_TCP, family, CONNECTION_STATES, read)
                except NamespaceGone:
                    del read.changed[at:]
                    continue
                except OSError as e:
                    log.warning("sock_diag in netns %s failed: %s", ns.inode, e)
                    return 0  # keep what we have; the next view asks again
                kernel.extend((d, ns) for d in read.changed[at:])
        gone = read.gone() if self._connection_keys is not None else None
        tw_next = read.timewait_ms / 1000 if read.timewait_ms >= 0 else math.inf
        changed = self._apply_connection_changes(kernel, gone, time.monotonic_ns(), self.recent_owners, tw_next)
        self._connection_keys = read.seen
        self._synced_generation = generation
        self.stats.connection_syncs += 1
        self.stats.connection_sync_s = time.monotonic() - t0
        return changed

    def apply_connections(
        self,
        kernel: Sequence[tuple[sockdiag.DiagSock, Namespace]],
        now_ns: int,
        owners: dict[int, int] | Callable[[], dict[int, int]],
    ) -> int:
        """Make the connection rows the kernel's (`kernel`: every connection of every
        namespace, as read just now). Returns how many rows changed."""
        tw = [d.expires_ms for d, _ns in kernel if d.timewait]
        return self._apply_connection_changes(kernel, None, now_ns, owners, min(tw) / 1000 if tw else math.inf)

    def _apply_connection_changes(
        self,
        kernel: Sequence[tuple[sockdiag.DiagSock, Namespace]],
        gone: set[int] | None,
        now_ns: int,
        owners: dict[int, int] | Callable[[], dict[int, int]],
        timewait_s: float,
    ) -> int:
        """Take connections read from the kernel: `kernel` the new or changed ones (or
        all), `gone` the cookies read before and not now (None: `kernel` is every
        connection, and any connection row not in it is gone). `timewait_s`: when the
        first TIME-WAIT row read ends. A new row's owner is who connect()ed it (`owners`:
        cookie -> pid, or what reads it: read only if a row is new), named now as the
        hooks' rows are (views group and sort by the name before the owner rule checks a
        screenful), else its listener's (accepted), else none until a view's /proc look.
        Its age starts at this read (a connection is first seen by a view)."""
        rows = self.rows
        seen: set[int] = set()
        added: list[SockRow] = []
        names: dict[int, str | None] = {}  # pid -> its process name, read once per pid
        changed = 0
        for d, ns in kernel:
            cookie = d.cookie
            seen.add(cookie)
            row = rows.get(cookie)
            if row is None:
                row = row_from_diag(d, ns, self._unnamed)
                row.born_ns = now_ns
                if not isinstance(owners, dict):
                    owners = owners()  # once, at the first new row
                pid = owners.get(cookie)
                if pid is not None and d.state != TcpState.TIME_WAIT:
                    row.pid, row.owner_source = pid, OWNER_HOOK
                    row.flags |= R_ACTIVE
                    if pid not in names:
                        names[pid] = procscan.process_name(pid)
                    row.comm = names[pid]  # None: exited; fix_owners looks for who holds it now
                rows[cookie] = row
                added.append(row)
                self._order.add(row)
                self._touch(cookie)
            elif (row.state, row.inode, row.local_port, row.remote_port, row.bound_dev) == (
                    d.state, d.inode, d.local_port, d.remote_port, d.bound_dev):  # fmt: skip
                continue
            elif not is_connection_row(row):
                continue  # a listener the events keep (the dump began before its listen)
            else:
                if d.state == TcpState.TIME_WAIT and row.state != TcpState.TIME_WAIT:
                    row.pid = row.comm = row.owner_source = row.container = None  # no file, so no owner (as ss -p)
                self._take_kernel_fields(row, d)
            self._changed.setdefault(cookie, None)  # (an update's shape is taken before it changes)
            changed += 1
        if gone is None:
            gone = {c for c, r in rows.items() if c not in seen and is_connection_row(r)}
        n_gone = 0
        for c in gone:
            r = rows.get(c)
            if r is None or not is_connection_row(r):
                continue  # (a listener now: the events keep it)
            if r.state == TcpState.TIME_WAIT:
                self.stats.expired += 1
            self._remove(c)
            n_gone += 1
        if added:
            self._inherit_listener_owners(added)
        self._timewait_next = time.monotonic() + timewait_s + 0.05
        if changed or n_gone:
            self.version += 1
        return changed + n_gone

    def name_devices(self) -> int:
        """Names for the devices rows are bound to (SO_BINDTODEVICE): an ifindex is its
        namespace's, so each is read inside it, once per namespace and read; rows bound
        to no device (nearly all) cost nothing. Returns how many rows were named."""
        want: dict[int, list[SockRow]] = {}
        for r in self.rows.values() if self._unnamed is None else [self.rows[c] for c in self._unnamed
                                                                    if c in self.rows]:  # fmt: skip
            if r.bound_dev and r.device is None:
                want.setdefault(r.netns_cookie, []).append(r)
        self._unnamed = set()
        named = 0
        for cookie, rows in want.items():
            ns = self.registry.by_cookie.get(cookie)
            if ns is None:
                continue  # gone: its rows go with it
            indexes = {r.bound_dev for r in rows}
            try:
                names = self.registry.using_fd(ns, functools.partial(_names_inside, indexes))
            except NamespaceGone:
                continue
            except OSError:
                self._unnamed.update(r.cookie for r in rows)  # not readable now: the next view asks again
                continue
            for r in rows:
                if r.bound_dev in names:
                    r.device = names[r.bound_dev]
                    self._touch(r.cookie)
                    named += 1
        if named:
            self.version += 1
        return named

    def port_ranges(self) -> dict[int, ports.PortRange]:
        """Each namespace's ephemeral range and reserved ports, read from inside it (a
        namespace's sysctls are its own), at most once per PORT_RANGE_SECONDS."""
        now = time.monotonic()
        out = {}
        for ns in list(self.registry.by_cookie.values()):
            cached = self._port_ranges.get(ns.cookie)
            if cached is None or now - cached[0] > PORT_RANGE_SECONDS:
                try:
                    v = self.registry.sysctls(ns, ("ipv4/ip_local_port_range", "ipv4/ip_local_reserved_ports",
                                                   "ipv4/ip_unprivileged_port_start"))  # fmt: skip
                    rng = ports.PortRange(
                        *ports.parse_range(v["ipv4/ip_local_port_range"]),
                        ports.parse_reserved(v["ipv4/ip_local_reserved_ports"]),
                        ports.parse_port_number(v["ipv4/ip_unprivileged_port_start"], "ip_unprivileged_port_start"),
                    )
                except (NamespaceGone, ports.SysctlError, OSError):
                    continue
                cached = self._port_ranges[ns.cookie] = (now, rng)
            out[ns.inode] = cached[1]
        for gone in self._port_ranges.keys() - self.registry.by_cookie.keys():
            del self._port_ranges[gone]
        return out

    # ---- the views' one way in ---------------------------------------------------------------

    def visible(self) -> list[SockRow]:
        """Visible rows in no order, one pass per table version (views that sort or
        count for themselves: sorting 100,000 rows for each screenful is wasted)."""
        version, rows = self._visible
        if version != self.version:
            rows = [r for r in self.rows.values() if r.visible]
            self._visible = (self.version, rows)
        return rows

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

    def ordered(self) -> tuple[list[SockRow], list[int]]:
        """The visible rows in order and their cookies, as kept (to read, not to change)."""
        rows = self._order.rows(self.visible)
        return rows, self._order.cookies()

    def snapshot(self, filters: Filters | None = None) -> list[SockRow]:
        """Visible rows in the kernel's grouping; sorted once per table version."""
        ordered = self._order.rows(self.visible)
        if filters is None or filters.empty:
            return list(ordered)
        return [r for r in ordered if filters.match(r)]
