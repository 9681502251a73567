"""The kernel's own tables (sock_diag), read for what no hook sees: the table at start,
TCP connections when a view asks (only sockets whose shown fields changed are
decoded), UDP sockets and listeners at each query, inodes and kernel-chosen local
sides, device names, and the reconcile that repairs what was lost."""

from __future__ import annotations

import functools
import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sockwatch import containers, ports
from sockwatch.kernel import procscan, sockdiag
from sockwatch.kernel.netns import Namespace, NamespaceGone, NamespaceRegistry, device_names, in_netns
from sockwatch.model import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    OWNER_HOOK,
    R_ACTIVE,
    SockRow,
    TcpState,
    sort_key,
)
from sockwatch.table.owners import Owners
from sockwatch.table.rules import NEED_ORPHAN, R_NO_CALLBACKS, is_connection_row, row_from_diag
from sockwatch.tally import shape

log = logging.getLogger(__name__)

PORT_RANGE_SECONDS = 10.0  # how long a namespace's ip_local_port_range is taken as read

CONNECTION_STATES = sockdiag.ALL_STATES & ~sockdiag.LISTEN_ONLY  # what sync_connections reads


def _names_inside(indexes: set[int], ns_fd: int) -> dict[int, str]:
    return in_netns(ns_fd, functools.partial(device_names, indexes))


@dataclass
class _Compared:
    """What a read of the (IP, port) tables did."""

    added: list[SockRow] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)  # cookies whose kernel fields differed unexpectedly
    removed: list[int] = field(default_factory=list)  # cookies the kernel no longer had (unreported ends)
    moved: bool = False  # anything changed, expected or not


class KernelSync(Owners):
    def __init__(self, registry: NamespaceRegistry | None = None, resolver: containers.Resolver | None = None) -> None:
        super().__init__(registry, resolver)
        self._connection_keys: set[bytes] | None = None  # what the last connection read saw (None: read whole)
        self._unnamed: set[int] | None = None  # rows that may be bound to a device not yet named (None: all)
        # what sync_connections last read: the hooks' generation then, and the moment its
        # first timewait socket ends (no hook sees that end: the clock does)
        self._synced_generation: int | None = None
        self._timewait_next = math.inf
        # cookie -> pid of recent TCP connect()s (the hooks' owner logs), read by a sync that finds new rows
        self.recent_owners: Callable[[], dict[int, int]] = dict
        self._port_ranges: dict[int, tuple[float, ports.PortRange]] = {}  # netns cookie -> (read at, range)

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

    def _compare_ip_port_tables(self, protocols: tuple[int, ...], drain: Callable[[], object]) -> _Compared:
        """Make the rows the kernel keys by (IP, port) — UDP sockets and TCP listeners of
        `protocols` — the kernel's: one sock_diag dump of each per namespace. `drain`
        applies the events that arrived during the dump before comparing: a row an event
        set after the dump began is newer than the dump, and a socket removed meanwhile is
        not mistaken for one the hooks missed. A namespace whose table cannot be read
        keeps its rows; one gone meanwhile loses them."""
        gen0 = self._gen
        self._removed_during = set()
        out = _Compared()
        kernel: dict[int, tuple[sockdiag.DiagSock, Namespace]] = {}
        unread: set[int] = set()  # namespaces whose table could not be read: their rows stay
        gone_ns: set[int] = set()
        try:
            with self.registry.reading():
                for ns in list(self.registry.by_cookie.values()):
                    try:
                        diag = self.registry.diag(ns)
                        dumps = [sockdiag.dump_all(diag, (proto,), sockdiag.LISTEN_ONLY if proto == IPPROTO_TCP
                                                   else sockdiag.ALL_STATES, meminfo=True)
                                 for proto in protocols]  # fmt: skip
                    except NamespaceGone:
                        gone_ns.add(ns.cookie)
                        continue
                    except OSError as e:
                        log.warning("sock_diag in netns %s failed: %s", ns.inode, e)
                        unread.add(ns.cookie)
                        continue
                    for dump in dumps:
                        for d in dump:
                            kernel[d.cookie] = (d, ns)
            if gone_ns:
                for c in [c for c, r in self.rows.items() if r.netns_cookie in gone_ns]:
                    self._remove(c)
                    out.moved = True
            drain()
            removed_meanwhile = self._removed_during
        finally:
            self._removed_during = None
        rows = self.rows
        for cookie, (d, ns) in kernel.items():
            row = rows.get(cookie)
            if row is None:
                if cookie in removed_meanwhile:
                    continue  # closed while we were dumping
                row = rows[cookie] = row_from_diag(d, ns, self._unnamed)
                if d.protocol == IPPROTO_TCP:
                    row.flags |= R_NO_CALLBACKS  # a listen() no hook saw: its end comes from a read too
                self._by_ip_port.add(cookie)
                self._order.add(row)
                self._touch(cookie)
                self._changed.setdefault(cookie, None)
                out.added.append(row)
            elif row.gen <= gen0:
                pending = self.pending.pop(cookie, None)
                if self._take_kernel_fields(row, d):
                    out.moved = True
                    if not pending:  # fields an event never carries are expected to differ until read
                        out.changed.append(cookie)
            elif not row.inode:
                row.inode = d.inode
                self._touch(cookie)
            if (row.recv_q, row.send_q) != (d.rqueue, d.wqueue):  # as read now: a queue is not a change to repair
                row.recv_q, row.send_q = d.rqueue, d.wqueue
                self._touch(cookie)
            if d.drops >= 0:  # (not shown in the table's rows: the drops view reads them)
                row.drops, row.rmem, row.rcvbuf = d.drops, d.rmem, d.rcvbuf
        gone = [
            c for c in self._by_ip_port
            if c not in kernel and (r := rows[c]).visible and r.gen <= gen0 and r.netns_cookie not in unread
            and r.protocol in protocols and (r.protocol == IPPROTO_UDP or r.state == TcpState.LISTEN)
        ]  # fmt: skip
        for c in gone:
            if not self.pending.get(c, set()) & {NEED_ORPHAN}:  # its end was not reported by design: not a repair
                out.removed.append(c)
            self._remove(c)
        if out.added or gone or out.moved:
            self._listeners = None
            self.version += 1
        return out

    def read_unhooked(self, drain: Callable[[], object] = lambda: None) -> list[SockRow]:
        """UDP sockets and TCP listeners as the kernel has them now, read when a view asks
        (the hook that would see them close runs for every socket, so it is attached only
        while someone streams). Bind and connect events keep their owners and the stream;
        this read is the table's truth for what they cannot see: a sendto() that bound a
        port, a close, a disconnect. Rows it adds have no owner until fix_owners looks in
        /proc (as ss -p does). Returns the rows added."""
        added = self._compare_ip_port_tables((IPPROTO_TCP, IPPROTO_UDP), drain).added
        self.stats.kernel_reads += 1
        self.stats.autobound_udp += sum(1 for r in added if r.protocol == IPPROTO_UDP and not r.is_connection)
        return added

    def reconcile(
        self,
        drain: Callable[[], object] = lambda: None,
        protocols: tuple[int, ...] = (IPPROTO_TCP, IPPROTO_UDP),
        repair: bool = True,
    ) -> dict[str, int]:
        """The same read as read_unhooked, after looking for new and dead namespaces,
        with what differed counted as repairs (the hooks should have told it), owners
        for the rows it added, and a check that every owner still holds its sockets.
        With repair=False the kernel is the only source for those protocols (a hook for
        them is missing): what it changes is a read, counted apart from repairs.
        (Connections are not compared: sync_connections reads them whole when asked.)"""
        t0 = time.monotonic()
        self.registry.refresh()
        self.forget_dead_namespaces()  # neither dumped nor kept
        c = self._compare_ip_port_tables(protocols, drain)
        counts = Counter({"added": len(c.added), "changed": len(c.changed), "removed": len(c.removed)})
        self._fill_owners(c.added)
        self.stats.owners_moved += self.verify_holders()  # expected: no hook sees fds passed
        if repair:
            self.stats.repaired_cookies.extend([r.cookie for r in c.added] + c.changed + c.removed)
            self.stats.repairs.update(+counts)
            self.stats.reconciles += 1
            self.stats.last_reconcile_s = time.monotonic() - t0
            self.stats.last_reconcile_at = time.monotonic()
        else:
            self.stats.kernel_reads += 1
        return dict(+counts)

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
        # Keys of the last read: only sockets whose shown fields differ are decoded (the
        # first read, and one after a bootstrap, decode all).
        read: sockdiag.ChangedRead[Namespace] = sockdiag.ChangedRead(
            self._connection_keys if self._connection_keys is not None else frozenset()
        )
        with self.registry.reading():
            socks = []
            try:
                for ns in list(self.registry.by_cookie.values()):
                    try:
                        socks.append((ns, self.registry.diag(ns)))
                    except NamespaceGone:
                        continue
                sockdiag.dump_changed(socks, IPPROTO_TCP, (socket.AF_INET, socket.AF_INET6), CONNECTION_STATES, read)
            except OSError as e:
                log.warning("sock_diag read of connections failed: %s", e)
                return 0  # keep what we have; the next view asks again
        kernel = read.changed
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
