"""Hook records into the table: binds, listens, UDP connects and a listener's end, as
they happen (a socket born and gone within a batch is never tabled). Connection
records are the stream's: the table reads connections from the kernel."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Sequence
from itertools import compress

from sockwatch import containers
from sockwatch import events as ev
from sockwatch.events import Event
from sockwatch.kernel.netns import NamespaceRegistry
from sockwatch.model import (
    IPPROTO_TCP,
    OWNER_HOOK,
    TcpState,
)
from sockwatch.table.rules import (
    NEED_INODE,
    NEED_ORPHAN,
    NEED_TUPLE,
    R_NO_CALLBACKS,
    R_RELEASED,
    Change,
    is_connection_event,
    row_from_event,
)
from sockwatch.table.store import TALLY_CHANGES_KEPT, Store
from sockwatch.tally import shape

log = logging.getLogger(__name__)

MAX_BIND_KEYS = 1000  # (protocol, port[, errno]) kept for the metrics, each

MAX_BOUND_OWNERS = 4096


class HookEvents(Store):
    def __init__(self, registry: NamespaceRegistry | None = None, resolver: containers.Resolver | None = None) -> None:
        super().__init__(registry, resolver)
        # Set where sockops cannot read the task (before 6.2): TCP sockets bound but not
        # yet listening or connecting -> their binder, for the listen/connect record
        self.owners_from_binds = False
        self._bound_owner: dict[int, tuple[int, int, str]] = {}

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
