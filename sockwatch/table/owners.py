"""Who owns each row: the hooks name a socket's creator; the rule applied when a view
asks renames owners that changed their name, finds who holds a socket whose owner
exited or passed it (/proc), and gives accepted connections their listener's owner."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from sockwatch import containers
from sockwatch.containers import Container
from sockwatch.kernel import procscan
from sockwatch.kernel.netns import NamespaceRegistry
from sockwatch.model import (
    IPPROTO_TCP,
    OWNER_LISTENER,
    OWNER_PROC,
    SockRow,
    TcpState,
)
from sockwatch.table.store import Store

log = logging.getLogger(__name__)

OWNER_SCAN_SECONDS = 5.0  # at most one /proc scan this often for owners that exited


class Owners(Store):
    def __init__(self, registry: NamespaceRegistry | None = None, resolver: containers.Resolver | None = None) -> None:
        super().__init__(registry, resolver)
        self._last_owner_scan = -OWNER_SCAN_SECONDS
        self._owner_scan_due = False  # an owner was found gone: its rows want a /proc scan
        self._owner_sought: set[int] = set()  # ownerless rows already looked for in /proc
        # what the last whole-table owner pass left: pid -> (name, container)
        self._owners_checked: dict[int, tuple[str, Container | None]] = {}
        self._owners_at_whole_pass = 0  # how many owners the last whole pass named

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

    def fill_owners(self) -> None:
        """Owners for rows no hook named: one /proc scan (sockets from before start), then
        listeners' owners for connections still in an accept queue (no file yet)."""
        need = [r for r in self.rows.values() if r.pid is None]
        self._fill_owners(need)
        self._listeners = None  # listeners may have just got theirs
        self._inherit_listener_owners(need)
        self.version += 1

    def _inherit_listener_owners(self, rows: Iterable[SockRow]) -> None:
        """An accepted connection belongs to whoever holds its listener."""
        for r in rows:
            if r.pid is None and r.protocol == IPPROTO_TCP and r.is_connection:
                lst = self.listener_of(r.netns, r.family, r.local_address, r.local_port)
                if lst is not None:
                    r.pid, r.uid, r.comm, r.owner_source = lst.pid, lst.uid, lst.comm, OWNER_LISTENER
                    r.container = lst.container
                    self._touch(r.cookie)

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
