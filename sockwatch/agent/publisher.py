"""The event stream: who subscribes, what each batch of records says to them, and the
stream's own budget.

Connection records cost the host and the agent for every connection, so the hooks send
them only while some subscriber wants a kind they make (the gate, SW_CFG_STREAM); the
hooks that see closes and UDP connects run for every socket or connect(), so they are
attached only while anyone subscribes. The
stream may take `cpu_budget` seconds of CPU a second; past it, it skips records and says
so (the table never skips).
"""

from __future__ import annotations

import errno
import ipaddress
import time
from collections.abc import Callable, Iterable

from sockwatch import events as ev
from sockwatch import filters as flt
from sockwatch import lookups, stream
from sockwatch.agent.clients import Client, Clients, Subscription
from sockwatch.drops import Drops
from sockwatch.drops import report as drop_report
from sockwatch.model import IPPROTO_UDP, SockRow
from sockwatch.table import Tracker
from sockwatch.table.rules import Change

STREAM_CHECK_EVERY = 256  # records between looks at the stream's CPU budget
CONNECTION_KINDS = frozenset({"connect", "accept", "state", "close"})  # what SW_CFG_STREAM sends


class Publisher:
    def __init__(self, tracker: Tracker, clients: Clients, cpu_budget: float) -> None:
        self.tracker = tracker
        self.clients = clients
        self.cpu_budget = cpu_budget
        self.subscribers: set[Client] = set()
        self.describer = stream.Describer()
        self.wall_offset = time.time() - time.monotonic()  # the hooks' clock is CLOCK_MONOTONIC
        self.set_gate: Callable[[bool], None] = lambda _on: None  # SW_CFG_STREAM, once the hooks are loaded
        self.set_hooks: Callable[[bool], None] = lambda _on: None  # the hooks only a stream needs, or not
        self.skipped_total = 0  # records skipped for the budget, before this second
        self._skipped = 0  # in this second
        self._cpu = 0.0  # spent in this second
        self._gate = False  # as last set
        self._hooks = False
        self._by_port: tuple[int, dict[tuple, list[SockRow]]] = (-1, {})
        self._misses_seen: dict[tuple[int, int, int], int] | None = None  # for the miss lines
        self._drops_seen: dict[int, dict[str, int]] | None = None  # for the drop lines: cookie -> reason -> n
        clients.on_drop = self.forget
        clients.charge_stream = self.charge

    @property
    def skipped(self) -> int:
        return self.skipped_total + self._skipped

    def charge(self, seconds: float) -> None:
        self._cpu += seconds

    def subscribe(self, c: Client, f: flt.Filters, kinds: Iterable[str]) -> None:
        if not self.subscribers:
            self.describer = stream.Describer()
            self._misses_seen = None  # misses from before the stream are not streamed
            self._drops_seen = None
        c.sub = Subscription(f, frozenset(kinds))
        self.subscribers.add(c)
        self._update_gate()

    def forget(self, c: Client) -> None:
        self.subscribers.discard(c)
        self._update_gate()

    def _update_gate(self) -> None:
        want = any(not c.sub.kinds or c.sub.kinds & CONNECTION_KINDS for c in self.subscribers if c.sub is not None)
        if want != self._gate:
            self.set_gate(want)
            self._gate = want
        if bool(self.subscribers) != self._hooks:
            self._hooks = bool(self.subscribers)
            self.set_hooks(self._hooks)

    def second(self) -> None:
        """Once a second: a new CPU budget for the stream, and what it skipped told."""
        self._cpu = 0.0
        if self._skipped:
            self._to_all(stream.lost_line(self._skipped, time.time(), "stream"))
            self.skipped_total += self._skipped
            self._skipped = 0

    def apply(self, batch: ev.EventBatch) -> list[Change]:
        """A batch of records to subscribers and to the table."""
        t0 = time.thread_time()
        said = self._describe(batch, t0 + self.cpu_budget - self._cpu)
        changes = self.tracker.apply_batch(batch)
        self._complete(said)
        self.publish(said)
        self._cpu += time.thread_time() - t0
        return changes

    def _describe(self, batch: ev.EventBatch, until_cpu: float) -> list[stream.StreamEvent]:
        """Every record of the batch as a stream event, before the tracker applies it (a
        socket born and gone within the batch is never tabled, but is streamed). Who
        holds the port of a failed bind is found here, as the table stood at the
        failure, for the same reason.

        The stream's CPU budget ends at thread time `until_cpu`: past it the rest of
        the batch is skipped for the stream (counted, and told to every subscriber);
        the table still gets every record."""
        rows = self.tracker.rows
        seen: dict[int, stream.StreamEvent] = {}  # each socket's latest event in this batch
        out = []
        describe, netns = self.describer.describe, self.tracker.netns_inode
        conns = self.describer.conns
        n = len(batch)
        for i in range(n):
            if i % STREAM_CHECK_EVERY == 0 and time.thread_time() > until_cpu:
                self._skipped += n - i  # the table before the stream: never behind for a reader
                break
            e = batch.event(i)
            last = seen.get(e.cookie)
            if last is not None:
                before: stream.Sock | None = last.sock
            elif (conn := conns.get(e.cookie)) is not None:
                before = conn
            elif (row := rows.get(e.cookie)) is not None:
                before = stream.sock_of_row(row)
            else:
                before = None
            said = describe(e, before, netns)
            if said is None:
                continue
            out.append(said)
            if said.kind == "bind_fail" and said.errno == errno.EADDRINUSE:
                # who holds the port: the answer to EADDRINUSE (an EACCES is about privilege,
                # checked before the port is looked at: a holder then is not the reason)
                key = (said.sock.netns, said.sock.protocol, said.sock.local_port)
                now = [(stream.sock_of_row(r), r.state) for r in self._visible_by_port().get(key, [])
                       if r.cookie not in seen]  # fmt: skip
                now += [(x.sock, x.state) for x in seen.values() if stream.holds(x)]
                said.holders = stream.conflicts(now, said.sock)
            if said.kind == "bind_fail" and said.sock.local_port:
                said.explain = stream.explain_bind_command(said.sock, said.bind_opts, self._device(said))
            seen[e.cookie] = said
        return out

    def _device(self, said: stream.StreamEvent) -> str | None:
        """The name of the device a failed bind's socket was bound to, in its namespace."""
        if not said.bound_dev:
            return None
        from sockwatch.kernel.netns import NamespaceGone, device_names, in_netns

        registry = self.tracker.registry
        ns = registry.by_inode.get(said.sock.netns)
        if ns is None:
            return None
        try:
            names = registry.using_fd(ns, lambda fd: in_netns(fd, lambda: device_names({said.bound_dev})))
        except (NamespaceGone, OSError):
            return None
        return names.get(said.bound_dev)

    def _visible_by_port(self) -> dict[tuple, list[SockRow]]:
        """Tabled sockets by (netns, protocol, port), built once per table version (bind
        failures come in bursts when a service retries)."""
        version, index = self._by_port
        if version != self.tracker.version:
            index = {}
            for r in self.tracker.rows.values():
                if r.visible:
                    index.setdefault((r.netns, r.protocol, r.local_port), []).append(r)
            self._by_port = (self.tracker.version, index)
        return index

    def _complete(self, said: list[stream.StreamEvent]) -> None:
        """What only the table, after the batch, can tell: an accepted connection's
        owner (its listener's) and the local side the kernel chose for a connected UDP
        socket."""
        t = self.tracker
        for s in said:
            if s.kind == "accept" and s.sock.pid is None:
                lst = t.listener_of(s.sock.netns, s.sock.family, ipaddress.ip_address(s.sock.local), s.sock.local_port)
                if lst is not None:
                    s.sock = s.sock._replace(pid=lst.pid, uid=lst.uid, comm=lst.comm)
                    if s.sock.cookie in self.describer.conns:
                        self.describer.remember_conn(s.sock)
        udp = [s for s in said if s.kind == "connect" and s.sock.protocol == IPPROTO_UDP]
        if udp:
            t.resolve_pending()
            for s in udp:
                row = t.rows.get(s.sock.cookie)
                if row is not None and row.local_port:
                    s.sock = s.sock._replace(local=stream.sock_of_row(row).local, local_port=row.local_port)

    def publish(self, said: list[stream.StreamEvent]) -> None:
        wall, of_pid = self.wall_offset, self.tracker.containers.of_pid
        lines: list[bytes | None] = [None] * len(said)  # each rendered once, for every subscriber
        matches: list[stream.Match | None] = [None] * len(said)
        for c in list(self.subscribers):
            sub = c.sub
            assert sub is not None
            chunks = []
            for i, s in enumerate(said):
                if sub.kinds and s.kind not in sub.kinds:
                    continue
                if not sub.filters.empty:
                    m = matches[i] or stream.Match(s)
                    matches[i] = m
                    if not sub.filters.match(m):  # type: ignore[arg-type]
                        continue
                line = lines[i]
                if line is None:
                    pid = s.sock.pid
                    line = lines[i] = s.json_line(wall, of_pid(pid) if pid is not None else None)
                chunks.append(line)
            if chunks:
                self.clients.queue(c, [b"".join(chunks)])  # one send for the batch, not one per line

    def autobound(self, found: list[SockRow]) -> None:
        """UDP sockets a read found bound with no bind() (a sendto() bound them): told as
        binds."""
        found = [r for r in found if r.protocol == IPPROTO_UDP and not r.is_connection]
        if found and self.subscribers:
            now = time.monotonic_ns()
            self.publish(
                [stream.StreamEvent("bind", stream.sock_of_row(r), r.state, now, bind="sendto") for r in found]
            )

    def misses(self, counts: Iterable[lookups.Destination], inode_of: Callable[[int], int | None]) -> None:
        """Once a second while someone subscribes: the ports whose lookups found no
        socket since the last second, one `miss` line each (a scan shows as many)."""
        now: dict[tuple[int, int, int], int] = {}
        addrs: dict[tuple[int, int, int], set[str]] = {}
        for count in counts:
            if count.misses:
                k = (count.netns, count.protocol, count.port)  # the namespace's cookie
                now[k] = now.get(k, 0) + count.misses
                addrs.setdefault(k, set()).add(str(count.address))
        seen, self._misses_seen = self._misses_seen, now
        if seen is None:
            return
        wall = time.time()
        for (cookie, proto, port), n in sorted(now.items()):
            inode = inode_of(cookie)
            if n <= seen.get((cookie, proto, port), 0) or inode is None:
                continue
            where = sorted(addrs[(cookie, proto, port)])
            line = stream.miss_line(wall, inode, proto, port, n - seen.get((cookie, proto, port), 0), where)
            row = lookups.virtual_row(inode, proto, 6 if ":" in where[0] else 4, ipaddress.ip_address(where[0]), port,
                                      None)  # fmt: skip
            for c in list(self.subscribers):
                sub = c.sub
                if sub is None or (sub.kinds and "miss" not in sub.kinds):
                    continue
                if sub.filters.empty or sub.filters.match(row):
                    self.clients.queue(c, [line])

    def drops(self, found: Iterable[tuple[SockRow, Drops]]) -> None:
        """Once a second while someone subscribes: each socket that dropped packets since
        the last second, one `drop` line (how many, by reason), as `miss` lines are."""
        rows = {r.cookie: (r, d) for r, d in found}
        now = {c: dict(d.reasons) for c, (_r, d) in rows.items()}
        seen, self._drops_seen = self._drops_seen, now
        if seen is None:
            return
        wall = time.time()
        for cookie, reasons in sorted(now.items()):
            before = seen.get(cookie, {})
            grew = {k: v - before.get(k, 0) for k, v in reasons.items() if v > before.get(k, 0)}
            if not grew:
                continue
            r, d = rows[cookie]
            shown = drop_report([(r, d)], flt.Filters())[0]
            line = stream.drop_line(wall, shown, sum(grew.values()), grew)
            for c in list(self.subscribers):
                sub = c.sub
                if sub is None or (sub.kinds and "drop" not in sub.kinds):
                    continue
                if sub.filters.empty or sub.filters.match(r):
                    self.clients.queue(c, [line])

    def lost(self, events: int) -> None:
        """Records the ring could not hold: told."""
        self._to_all(stream.lost_line(events, time.time(), "ring"))

    def _to_all(self, line: bytes) -> None:
        for c in list(self.subscribers):
            self.clients.queue(c, [line])
