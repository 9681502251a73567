"""The one owner of the socket table. Data flows one way into it (bootstrap dump, hook
events, reconcile) and out of it to the views (snapshots, later live/events/metrics).

What hooks cannot see is read from the kernel's own tables (sock_diag) and said so:
a socket's inode, the local side the kernel chose for a connected UDP socket, whether a
closed TCP socket became TIME-WAIT, and sockets from before sockwatch started.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sockwatch.filters import Filters
from sockwatch.kernel import abi, procscan, sockdiag
from sockwatch.kernel.netns import Namespace, NamespaceRegistry
from sockwatch.model import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    OWNER_HOOK,
    OWNER_LISTENER,
    OWNER_PROC,
    SockRow,
    TcpState,
    sort_key,
    wildcard,
)

log = logging.getLogger(__name__)

# Why a row waits for a sock_diag read.
NEED_INODE = "inode"
NEED_TUPLE = "tuple"  # connected UDP: the kernel chose the local side
NEED_TIMEWAIT = "timewait"  # TCP closed from FIN-WAIT-2/CLOSING: TIME-WAIT or reset?
NEED_ORPHAN = "orphan"  # released TCP socket without state callbacks (from before start)
TCP_GONE_AT_RELEASE = (TcpState.CLOSE, TcpState.LISTEN, TcpState.SYN_SENT)


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass
class Stats:
    events: Counter = field(default_factory=Counter)  # by kind name
    repairs: Counter = field(default_factory=Counter)  # reconcile fixes, by kind
    expired: int = 0  # TIME-WAIT rows the kernel let go (expected, not a repair)
    reconciles: int = 0
    resolves: int = 0
    resyncs: int = 0
    unresolved: int = 0
    unknown_netns: int = 0  # events dropped: their namespace was gone before we could name it
    last_reconcile_s: float = 0.0
    repaired_cookies: deque = field(default_factory=lambda: deque(maxlen=4096))

    def as_dict(self) -> dict:
        return {
            "events": dict(self.events),
            "repairs": dict(self.repairs),
            "timewait_expired": self.expired,
            "reconciles": self.reconciles,
            "resolves": self.resolves,
            "resyncs": self.resyncs,
            "unresolved": self.unresolved,
            "unknown_netns": self.unknown_netns,
            "last_reconcile_seconds": round(self.last_reconcile_s, 4),
            "repaired_cookies": list(self.repaired_cookies),
        }


def row_from_diag(d: sockdiag.DiagSock, ns: Namespace) -> SockRow:
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
    )


class Tracker:
    def __init__(self, registry: NamespaceRegistry | None = None) -> None:
        self.registry = registry or NamespaceRegistry()
        self.rows: dict[int, SockRow] = {}
        self.pending: dict[int, set[str]] = {}  # cookie -> reasons
        self.pending_tries: Counter = Counter()
        self.removed_at: dict[int, int] = {}  # cookie -> boottime ns, guards reconcile races
        self.stats = Stats()
        self.version = 0  # bumped on every change: views cache what they built from it
        self._sorted: tuple[int, list[SockRow]] = (-1, [])
        self._listeners: dict[tuple, SockRow] | None = None  # rebuilt lazily after a change

    # ---- reading the kernel's own tables -------------------------------------------------

    def _dump(
        self,
        ns: Namespace,
        protocols: tuple[int, ...] = (IPPROTO_TCP, IPPROTO_UDP),
        states: int = sockdiag.ALL_STATES,
    ) -> list[sockdiag.DiagSock]:
        try:
            return sockdiag.dump_all(ns.diag, protocols, states)
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
                row.touch()

    def bootstrap(self, hook_rows: Iterable[abi.SwSock] = ()) -> None:
        """The table as the kernel has it now; owners from hooks where they had them."""
        self.registry.refresh()
        hooked = {s.cookie: s for s in hook_rows if s.flags & abi.SW_F_OWNER}
        fresh: list[SockRow] = []
        for ns in list(self.registry.by_inode.values()):
            for d in self._dump(ns):
                row = row_from_diag(d, ns)
                h = hooked.get(row.cookie)
                if h is not None:
                    row.pid, row.uid, row.comm = h.pid, h.uid, h.comm.decode(errors="replace")
                    row.owner_source = OWNER_HOOK
                self.rows[row.cookie] = row
                fresh.append(row)
        self._fill_owners(fresh)
        self._listeners = None
        self._inherit_listener_owners(fresh)
        self.version += 1

    # ---- hook events ---------------------------------------------------------------------

    def _netns_inode(self, s: abi.SwSock) -> int | None:
        ns = self.registry.resolve_cookie(s.netns_cookie, s.pid or None)
        return ns.inode if ns is not None else None

    def _need(self, cookie: int, reason: str) -> None:
        self.pending.setdefault(cookie, set()).add(reason)

    def _remove(self, cookie: int, when: int) -> None:
        row = self.rows.pop(cookie, None)
        if row is not None and row.state == TcpState.LISTEN:
            self._listeners = None
        self.version += 1
        self.pending.pop(cookie, None)
        self.pending_tries.pop(cookie, None)
        self.removed_at[cookie] = when

    def apply(self, ev: abi.SwEvent) -> None:
        s = ev.sock
        kind = ev.kind
        self.stats.events[abi.EVENT_NAMES.get(kind, str(kind))] += 1
        self.version += 1
        cookie = s.cookie
        old = self.rows.get(cookie)
        if TcpState.LISTEN in (s.state, ev.old_state) or (old is not None and old.state == TcpState.LISTEN):
            self._listeners = None

        if kind == abi.SW_EV_RELEASE:
            if old is None:
                return
            if s.protocol == IPPROTO_UDP or ev.old_state in TCP_GONE_AT_RELEASE:
                self._remove(cookie, s.ts_ns)
                return
            old.flags |= abi.SW_F_RELEASED
            if not (s.flags & abi.SW_F_STATECB) and not (old.flags & abi.SW_F_STATECB):
                self._need(cookie, NEED_ORPHAN)  # no state callbacks: only the kernel knows its end
            return

        if kind == abi.SW_EV_STATE and s.state == TcpState.CLOSE:
            after = abi.tcp_state_after_close(ev.old_state)
            if after is None:
                if s.flags & abi.SW_F_RELEASED or old is None:
                    self._remove(cookie, s.ts_ns)
                else:
                    old.state = TcpState.CLOSE
                    old.ts_ns = s.ts_ns
                    old.touch()
                    self.pending.pop(cookie, None)
                return
            if old is not None:
                old.state = after
                old.inode = 0  # a time-wait socket has no inode, as ss shows
                old.ts_ns = s.ts_ns
                old.touch()
                self.pending[cookie] = {NEED_TIMEWAIT}
            return

        netns = self._netns_inode(s)
        if netns is None:
            self.stats.unknown_netns += 1
            return
        row = abi.row_from_sock(s, netns)
        if old is not None:
            # keep what the event cannot know
            row.inode = old.inode
            if row.pid is None:
                row.pid, row.uid, row.comm, row.owner_source = old.pid, old.uid, old.comm, old.owner_source
            if old.flags & abi.SW_F_RELEASED:
                row.flags |= abi.SW_F_RELEASED
        if s.protocol == IPPROTO_UDP:
            row.state = TcpState.ESTABLISHED if kind == abi.SW_EV_UDP_CONNECT else TcpState.CLOSE
        if kind == abi.SW_EV_UDP_CONNECT:
            self._need(cookie, NEED_TUPLE)
        if kind == abi.SW_EV_ACCEPT and row.pid is None:
            self._inherit_listener_owners([row])
        self.rows[cookie] = row
        if row.visible and row.inode is None:
            self._need(cookie, NEED_INODE)
        elif not row.visible and NEED_INODE in self.pending.get(cookie, ()):
            self.pending[cookie].discard(NEED_INODE)

    def _inherit_listener_owners(self, rows: Iterable[SockRow]) -> None:
        """An accepted connection belongs to whoever holds its listener (exact address
        first, then the wildcard; a dual-stack listener also takes IPv4)."""
        need = [r for r in rows if r.pid is None and r.protocol == IPPROTO_TCP and r.is_connection]
        if not need:
            return
        if self._listeners is None:  # one pass after listeners changed, not one per accept
            self._listeners = {}
            for r in self.rows.values():
                if r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN and r.pid is not None:
                    self._listeners.setdefault((r.netns, r.family, r.local_address, r.local_port), r)
        listeners = self._listeners
        for r in need:
            cands = [
                (r.netns, r.family, r.local_address, r.local_port),
                (r.netns, r.family, wildcard(r.family), r.local_port),
            ]
            mapped = getattr(r.local_address, "ipv4_mapped", None)
            if mapped is not None:
                cands.append((r.netns, 4, mapped, r.local_port))
                cands.append((r.netns, 4, wildcard(4), r.local_port))
            for key in cands:
                lst = listeners.get(key)
                if lst is not None:
                    r.pid, r.uid, r.comm, r.owner_source = lst.pid, lst.uid, lst.comm, OWNER_LISTENER
                    if r.inode is not None:
                        r.touch()
                    break

    # ---- reading the kernel for what hooks cannot see ---------------------------------------

    def resolve_pending(self, max_tries: int = 5, exact_limit: int = 256) -> int:
        """Read from the kernel what waiting rows need, as cheaply as the kernel allows:
        TCP connections by exact 4-tuple lookups (O(1) each), listeners from the listener
        hash only, everything else (and bursts) with one dump per namespace and protocol."""
        if not self.pending:
            return 0
        groups: dict[tuple[int, int], list[int]] = {}
        for cookie in list(self.pending):
            row = self.rows.get(cookie)
            if row is None or not self.pending[cookie]:
                self.pending.pop(cookie, None)
                continue
            groups.setdefault((row.netns, row.protocol), []).append(cookie)
        fixed = 0
        for (netns, proto), cookies in groups.items():
            ns = self.registry.by_inode.get(netns)
            if ns is None:
                for c in cookies:
                    self._remove(c, boottime_ns())
                continue
            found: dict[int, sockdiag.DiagSock | None] = {}
            rest = cookies
            if proto == IPPROTO_TCP:
                conns = [c for c in cookies if self.rows[c].is_connection]
                if len(conns) <= exact_limit:
                    for c in conns:
                        found[c] = self._lookup(ns, self.rows[c])
                    rest = [c for c in cookies if c not in found]
            if rest:
                only_listeners = proto == IPPROTO_TCP and all(self.rows[c].state == TcpState.LISTEN for c in rest)
                states = sockdiag.LISTEN_ONLY if only_listeners else sockdiag.ALL_STATES
                kernel = {d.cookie: d for d in self._dump(ns, (proto,), states)}
                found.update((c, kernel.get(c)) for c in rest)
            self.stats.resolves += 1
            for c, d in found.items():
                row = self.rows[c]
                reasons = self.pending.get(c, set())
                if d is None or d.cookie != c:
                    if reasons & {NEED_TIMEWAIT, NEED_ORPHAN}:
                        self._remove(c, boottime_ns())  # it is gone from the kernel too
                        fixed += 1
                        continue
                    self.pending_tries[c] += 1
                    if self.pending_tries[c] >= max_tries:
                        self.stats.unresolved += 1
                        self.pending.pop(c, None)
                        self.pending_tries.pop(c, None)
                    continue
                self._take_kernel_fields(row, d)
                self.pending.pop(c, None)
                self.pending_tries.pop(c, None)
                fixed += 1
        if fixed:
            self.version += 1
            self._listeners = None
        return fixed

    def _lookup(self, ns: Namespace, row: SockRow) -> sockdiag.DiagSock | None:
        assert row.remote_address is not None
        try:
            return sockdiag.lookup_one(
                ns.diag,
                row.protocol,
                row.family,
                row.local_address,
                row.local_port,
                row.remote_address,
                row.remote_port,
            )
        except OSError as e:
            log.warning("sock_diag lookup in netns %s failed: %s", ns.inode, e)
            return None

    @staticmethod
    def _take_kernel_fields(row: SockRow, d: sockdiag.DiagSock) -> bool:
        """Copy state/addresses/inode from the kernel; True if anything but the inode differed."""
        connected = d.remote_port != 0
        remote = d.remote_address if connected else None
        changed = (
            row.state != d.state
            or row.local_address != d.local_address
            or row.local_port != d.local_port
            or row.remote_address != remote
            or row.remote_port != d.remote_port
        )
        row.state = d.state
        row.local_address, row.local_port = d.local_address, d.local_port
        row.remote_address, row.remote_port = remote, d.remote_port
        row.inode = d.inode
        if row.uid is None:
            row.uid = d.uid
        row.touch()
        return changed

    def reconcile(self, drain: Callable[[], None] = lambda: None) -> dict[str, int]:
        """Compare every namespace's kernel table with ours, repair and count differences.

        `drain` applies the events that arrived during the dump before comparing, so a
        socket that opened or closed meanwhile is not mistaken for drift.
        """
        t0 = time.monotonic()
        start = boottime_ns()
        self.registry.refresh()
        kernel: dict[int, tuple[sockdiag.DiagSock, Namespace]] = {}
        for ns in list(self.registry.by_inode.values()):
            for d in self._dump(ns):
                kernel[d.cookie] = (d, ns)
        drain()
        for ns in self.registry.prune():
            for c in [c for c, r in self.rows.items() if r.netns == ns.inode]:
                self._remove(c, boottime_ns())
        added: list[SockRow] = []
        counts: Counter = Counter()
        for cookie, (d, ns) in kernel.items():
            row = self.rows.get(cookie)
            if row is None:
                if self.removed_at.get(cookie, 0) > start:
                    continue  # closed while we were dumping
                row = row_from_diag(d, ns)
                self.rows[cookie] = row
                added.append(row)
                counts["added"] += 1
                self.stats.repaired_cookies.append(cookie)
            elif row.ts_ns <= start:
                if self._take_kernel_fields(row, d):
                    counts["changed"] += 1
                    self.stats.repaired_cookies.append(cookie)
                self.pending.pop(cookie, None)
            elif row.inode is None:
                row.inode = d.inode
                row.touch()
        for cookie, row in list(self.rows.items()):
            if cookie in kernel or not row.visible or row.ts_ns > start:
                continue
            if row.state == TcpState.TIME_WAIT:
                self.stats.expired += 1
            else:
                counts["removed"] += 1
                self.stats.repaired_cookies.append(cookie)
            self._remove(cookie, boottime_ns())
        self._listeners = None
        self._fill_owners(added)
        self._inherit_listener_owners(added)
        self.version += 1
        now = boottime_ns()
        self.removed_at = {c: t for c, t in self.removed_at.items() if now - t < 120_000_000_000}
        self.stats.repairs.update(counts)
        self.stats.reconciles += 1
        self.stats.last_reconcile_s = time.monotonic() - t0
        return dict(counts)

    # ---- the views' one way in ---------------------------------------------------------------

    def snapshot(self, filters: Filters | None = None) -> list[SockRow]:
        """Visible rows in the kernel's grouping; sorted once per table version."""
        version, ordered = self._sorted
        if version != self.version:
            ordered = sorted((r for r in self.rows.values() if r.visible), key=sort_key)
            self._sorted = (self.version, ordered)
        if filters is None or filters.empty:
            return list(ordered)
        return [r for r in ordered if filters.match(r)]
