"""`sockwatch serve`: load the BPF programs once, keep the tracker live, answer local
queries. One thread: an epoll loop over the ring buffer and the query socket.

The hooks do not wake the agent per event: it drains the ring every `drain_interval`
(the bound on how stale the table can be between queries), when the BPF side forces a
wakeup because a burst is filling the ring, and before answering any query (so an
answer includes everything that happened before it was asked). What the hooks leave to
a kernel read is read when a query needs it, not per event: TCP connections above all,
whose records reach the ring only while a subscriber streams them (`_update_stream_gate`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import math
import os
import resource
import select
import signal
import socket
import ssl
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, generate_latest

from sockwatch import __version__, containers, lookups, metric_limits, metrics, stream, tally, views
from sockwatch import events as ev
from sockwatch import filters as flt
from sockwatch.agent import sockpath, webconfig
from sockwatch.agent.protocol import MAX_REQUEST, ProtocolError, Request, encode_header, parse_request
from sockwatch.kernel import bpfload, bpfstats, prereq
from sockwatch.kernel.ringbuf import RingReader
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, render_json
from sockwatch.tracker import Tracker

log = logging.getLogger(__name__)


REQUEST_SECONDS = 5.0  # to send one request line
ANSWER_SECONDS = 60.0  # to read one whole answer (a 100,000-row snapshot is ~30 MB)
MAX_CLIENTS = 64
JSON_CACHE_SECONDS = 10.0
LOSS_MEMORY_SECONDS = 60.0  # how long answers mention a repaired loss
TRIM_SECONDS = 30.0
STREAM_BUFFER = 8 * 2**20  # a subscriber that falls this far behind is dropped
STREAM_CHECK_EVERY = 256  # records between looks at the stream's CPU budget
CONNECTION_KINDS = frozenset({"connect", "accept", "state", "close"})  # what SW_CFG_STREAM sends


@dataclass
class Subscription:
    """A client streaming events: what it asked for and how far behind it is."""

    filters: flt.Filters
    kinds: frozenset[str]
    queued: int = 0  # bytes waiting for the client to read


@dataclass(eq=False)
class Client:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: deque[memoryview] = field(default_factory=deque)
    poll: int = 0  # the epoll round that accepted it: events of that round were for an older fd
    sub: Subscription | None = None  # streaming events until it hangs up
    http: bool = False  # a scraper on the metrics port, not a local query


@dataclass
class Settings:
    socket_path: str
    reconcile_interval: float = 30.0
    drain_interval: float = 0.1
    drop_check_interval: float = 1.0
    max_udp: int = 65536
    ringbuf_pages: int = 4096
    max_lookup_keys: int = 16384
    max_udp_peers: int = 16384
    lookups: bool = True  # the sk_lookup hook in every namespace (serve --lookups)
    stream_cpu: float = 0.25  # seconds of CPU per second the event stream may take; past it, it skips and says so
    listen: tuple[str, int] | None = ("127.0.0.1", metric_limits.DEFAULT_PORT)  # /metrics and /healthz; None: off
    metrics_limits: metric_limits.Limits = field(default_factory=metric_limits.Limits)
    kubelet_log_dir: str = "/var/log"  # pods/ and containers/ name Kubernetes pods and containers
    web: webconfig.WebConfig | None = None  # TLS and basic auth for the metrics port


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class CostWindow:
    """The agent's own cost over the last minute, from one sample a second."""

    def __init__(self, seconds: int = 60) -> None:
        self.samples: deque[tuple[float, int, float]] = deque(maxlen=seconds + 1)
        self.sample(0, _cpu_seconds())

    def sample(self, events: int, cpu: float) -> None:
        self.samples.append((time.monotonic(), events, cpu))

    def last_minute(self, events: int, cpu: float) -> dict:
        t0, e0, c0 = self.samples[0]
        span = time.monotonic() - t0
        if span <= 0:
            return {"seconds": 0.0, "cpu_percent": 0.0, "events_per_second": 0.0}
        return {
            "seconds": round(span, 1),
            "cpu_percent": round(100 * (cpu - c0) / span, 2),
            "events_per_second": round((events - e0) / span, 1),
        }


MAX_HTTP_REQUEST = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _http_answer(
    status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", head: bool = False, extra: bytes = b""
) -> list[bytes]:
    top = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n").encode() + extra + b"\r\n"  # fmt: skip
    return [top] if head else [top, body]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_parts() -> dict[str, int]:
    """RSS split as the kernel counts it: our heap (anon), mapped files (libbcc, LLVM),
    shared memory (the ring buffer's pages, mapped twice)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, kb, _ = line.split()
                parts[name[3:-1].lower()] = int(kb) * 1024
    return parts


def _give_back_memory() -> None:
    """Return freed heap to the kernel (compiling with bcc/LLVM frees ~40 MiB that glibc
    would otherwise keep)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.tracker = Tracker(resolver=containers.Resolver(
            pods_dir=os.path.join(settings.kubelet_log_dir, "pods"),
            containers_dir=os.path.join(settings.kubelet_log_dir, "containers"),
        ))  # fmt: skip
        self.loaded: bpfload.Loaded | None = None
        self.ring: RingReader | None = None
        self.listener: socket.socket | None = None
        self.http_listener: socket.socket | None = None
        self.metrics_address = ""  # where /metrics is served, once listening
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector: metrics.SockwatchCollector | None = None
        self.claim: sockpath.Claim | None = None
        self.clients: dict[int, Client] = {}
        self.clients_dropped: Counter[str] = Counter()
        self._ep: select.epoll | None = None
        self._poll = 0
        self._stop = False
        self._last_losses = (0, 0)
        self._last_counters: dict[str, int] = {}
        self._misses_seen: dict[tuple[int, int, int], int] | None = None  # for the stream's miss lines
        self._recent_losses: deque[tuple[float, int, int]] = deque(maxlen=64)  # (when, ring, map)
        self._udp_announced_by_us = 0
        self.cost = CostWindow()
        self.load_seconds = 0.0
        self.bootstrap_seconds = 0.0
        self._json_cache: tuple[int, bytes] = (-1, b"")
        self._json_cache_used = 0.0
        self.subscribers: set[Client] = set()
        self.describer = stream.Describer()
        self.wall_offset = time.time() - time.monotonic()  # the hooks' clock is CLOCK_MONOTONIC
        self._by_port: tuple[int, dict[tuple, list[SockRow]]] = (-1, {})
        self._stream_cpu = 0.0  # spent on the stream in this second
        self._stream_skipped = 0  # records skipped in this second for the budget
        self.stream_skipped_total = 0
        self._streaming = False  # SW_CFG_STREAM as last set
        self.bpf_stats = bpfstats.StatsWindow()  # the kernel's run counts, on only while asked
        self._bpf_runs: dict[str, bpfstats.Runs] | None = None  # each hook's counts, as last read
        self._bpf_runs_counting = False  # the kernel was counting at that read

    # ---- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        prereq.require()  # before creating anything: a refused start leaves nothing behind
        self.claim = sockpath.claim(self.settings.socket_path)
        self.listener = self.claim.listener
        if self.settings.listen is not None:
            self.http_listener = self._listen_http(self.settings.listen)
        t0 = time.monotonic()
        st = self.settings
        self.loaded = bpfload.load_and_attach(
            bpfload.Sizes(st.max_udp, st.ringbuf_pages, st.max_lookup_keys, st.max_udp_peers),
            self.tracker.registry,
            st.lookups,
        )
        self.ring = self.loaded.open_ring(self.settings.ringbuf_pages)
        for m in self.loaded.missing:
            log.warning("running without %s: %s", m.hook.what, m.why)
        for note in self.loaded.lesser:
            log.warning("%s", note)
        self.tracker.owners_from_binds = not self.loaded.tcp_owners
        self.tracker.recent_owners = self.loaded.recent_owners
        self.loaded.set_stream(False)
        if self.loaded.missing:
            log.warning("%s", self.loaded.degraded())
        self.load_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        # Hooks are live from here: the dump sees everything older, events everything newer.
        self.tracker.bootstrap()
        self.drain()
        self.tracker.fill_owners()
        self._follow_namespaces()
        self.bootstrap_seconds = time.monotonic() - t0
        _give_back_memory()
        bpfload.release_compiler_pages()
        c = self.loaded.counters()
        self._last_losses = (c["ringbuf_full"], c["map_full"])
        log.info("attached; %d sockets in %d namespaces", len(self.tracker.rows), len(self.tracker.registry.by_cookie))

    def _listen_http(self, where: tuple[str, int]) -> socket.socket:
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise sockpath.PathError(f"cannot listen for metrics on {host}:{port}: {e.strerror}") from None
        s.listen(64)
        self.metrics_address = f"[{host}]:{s.getsockname()[1]}" if ":" in host else f"{host}:{s.getsockname()[1]}"
        self.collector = metrics.SockwatchCollector(
            tally=self.tracker.tally,
            port_ranges=self.tracker.port_ranges,
            bind_failures=lambda: dict(self.tracker.stats.bind_failures),
            binds=lambda: dict(self.tracker.stats.binds),
            health=self._health,
            limits=self.settings.metrics_limits,
            fix_owners=self.tracker.fix_owners,
            lookups=self._lookup_sample,
        )
        self.registry.register(self.collector)
        return s

    def metrics_url(self) -> str | None:
        if not self.metrics_address:
            return None
        tls = self.settings.web is not None and self.settings.web.tls is not None
        return f"{'https' if tls else 'http'}://{self.metrics_address}/metrics"

    def _health(self) -> metrics.Health:
        assert self.loaded is not None
        c = self._last_counters or self.loaded.counters()
        t = self.tracker.stats
        return metrics.Health(
            events_lost={
                "ring": c.get("ringbuf_full", 0),
                "udp_owner_map": c.get("map_full", 0),
                "stream": self.stream_skipped_total,
            },
            udp_map_entries=c.get("udp_created", 0) - c.get("udp_silent_gone", 0),
            udp_map_capacity=self.settings.max_udp,
            repairs=dict(t.repairs),
            reconciles=t.reconciles,
            last_reconcile_age=time.monotonic() - t.last_reconcile_at,
            programs_attached=len(self.loaded.links),
            hooks_missing=len(self.loaded.missing),
            cpu_seconds=_cpu_seconds(),
            events=t.events.total(),
            version=__version__,
            tcp_opened=c.get("tcp_opened", 0),
            bpf_programs={what: (r.runs, r.run_ns) for what, r in self._bpf_programs().items()},
        )

    def stop(self, *_: object) -> None:
        self._stop = True

    def close(self) -> None:
        self.bpf_stats.close()
        for c in list(self.clients.values()):
            self._drop(c)
        if self.http_listener is not None:
            self.http_listener.close()
            self.http_listener = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None
            self.listener = None
        if self.loaded is not None:
            self.loaded.close()

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        assert self.loaded is not None and self.listener is not None and self.ring is not None
        if threading.current_thread() is threading.main_thread():  # else the front end owns signals
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        ep = self._ep = select.epoll()
        ep.register(self.ring.fd, select.EPOLLIN)
        ep.register(self.listener.fileno(), select.EPOLLIN)
        if self.http_listener is not None:
            ep.register(self.http_listener.fileno(), select.EPOLLIN)
        now = time.monotonic()
        next_drain = now + self.settings.drain_interval
        next_second = now + self.settings.drop_check_interval
        next_reconcile = now + self.settings.reconcile_interval
        next_trim = now + TRIM_SECONDS
        while not self._stop:
            timeout = max(0.0, min(next_drain, next_second, next_reconcile, self._next_deadline()) - time.monotonic())
            try:
                ready = ep.poll(timeout)
            except InterruptedError:
                continue
            self._poll += 1
            for fd, mask in ready:
                if fd == self.ring.fd:
                    self.drain()
                elif fd == self.listener.fileno():
                    self._accept(self.listener)
                elif self.http_listener is not None and fd == self.http_listener.fileno():
                    self._accept(self.http_listener, http=True)
                elif (c := self.clients.get(fd)) is not None and c.poll != self._poll:
                    self._on_client(c, mask)
            now = time.monotonic()
            self._expire_clients(now)
            if now >= next_drain:
                self.drain()
                next_drain = now + self.settings.drain_interval
            if now >= next_second:
                self.bpf_stats.close_if_over(now)
                self._check_losses()
                self.tracker.forget_dead_namespaces()
                self._follow_namespaces()
                if self.subscribers:
                    self._find_autobound()  # subscribers hear of sendto() binds within a second
                self._stream_second()
                if self.subscribers:
                    self._stream_misses()
                if self.collector is not None:
                    self.tracker.tally()  # follow changes each second, so that a scrape finds few
                if now >= next_trim:
                    _give_back_memory()  # what bursts of answers and batch map reads freed
                    next_trim = now + TRIM_SECONDS
                if self._json_cache[0] >= 0 and now - self._json_cache_used > JSON_CACHE_SECONDS:
                    self._json_cache = (-1, b"")  # the whole table as JSON: worth keeping only while asked
                self.cost.sample(self.tracker.stats.events.total(), _cpu_seconds())
                next_second = now + self.settings.drop_check_interval
            if now >= next_reconcile:
                self.tracker.reconcile(drain=self.drain)
                # a full comparison is O(sockets): keep it under 0.5% of one CPU however large the table
                spent = self.tracker.stats.last_reconcile_s
                next_reconcile = time.monotonic() + max(self.settings.reconcile_interval, 200 * spent)
        for c in list(self.clients.values()):
            self._drop(c)
        self._ep = None
        ep.close()

    def _follow_namespaces(self) -> None:
        """Find namespaces created since the last tick and give each the lookup hook;
        release the hooks of those gone (forget_dead_namespaces found them)."""
        if self.loaded is None or self.loaded.lookup is None:
            return
        self.tracker.registry.refresh()
        attached, released = self.loaded.lookup.follow(self.tracker.registry)
        if attached or released:
            log.info("sk_lookup: attached to %d namespaces, released %d", attached, released)

    def drain(self) -> list:
        """Apply every event the hooks committed so far; returns what changed."""
        if self.ring is None:
            return []
        changes = []
        for batch in self.ring.read():
            if not self.subscribers:
                changes += self.tracker.apply_batch(batch)
                continue
            t0 = time.thread_time()
            said = self._describe(batch, t0 + self.settings.stream_cpu - self._stream_cpu)
            changes += self.tracker.apply_batch(batch)
            self._complete(said)
            self._publish(said)
            self._stream_cpu += time.thread_time() - t0
        return changes

    def _update_stream_gate(self) -> None:
        """Connection records cost the host and the agent for every connection: the
        hooks send them only while some subscriber wants a kind they make."""
        want = any(not c.sub.kinds or c.sub.kinds & CONNECTION_KINDS for c in self.subscribers if c.sub is not None)
        if self.loaded is not None and want != self._streaming:
            self.loaded.set_stream(want)
            self._streaming = want

    def _stream_second(self) -> None:
        """Once a second: a new CPU budget for the stream, and what it skipped told."""
        self._stream_cpu = 0.0
        if self._stream_skipped:
            line = stream.lost_line(self._stream_skipped, 0, time.time(), "stream")
            for c in list(self.subscribers):
                self._queue(c, [line])
            self.stream_skipped_total += self._stream_skipped
            self._stream_skipped = 0

    # ---- the event stream -------------------------------------------------------------

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
                self._stream_skipped += n - i  # the table before the stream: never behind for a reader
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
            seen[e.cookie] = said
        return out

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

    def _publish(self, said: list[stream.StreamEvent]) -> None:
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
                self._queue(c, [b"".join(chunks)])  # one send for the batch, not one per line

    def _queue(self, c: Client, chunks: list[bytes]) -> None:
        """Queue lines for a subscriber and send what its socket takes now; one that has
        fallen STREAM_BUFFER behind is dropped (and counted), never waited for."""
        if not chunks or c.sub is None:
            return
        c.sub.queued += sum(map(len, chunks))
        if c.sub.queued > STREAM_BUFFER:
            self.clients_dropped["slow_subscriber"] += 1
            self._drop(c)
            return
        if not c.out:
            c.deadline = time.monotonic() + ANSWER_SECONDS
        c.out.extend(map(memoryview, chunks))
        self._flush(c)

    def _stream_misses(self) -> None:
        """Once a second while someone subscribes: the ports whose lookups found no
        socket since the last second, one `miss` line each (a scan shows as many)."""
        if self.loaded is None or self.loaded.lookup is None:
            return
        now: dict[tuple[int, int, int], int] = {}
        addrs: dict[tuple[int, int, int], set[str]] = {}
        for count in self.loaded.lookup.counts():
            if count.misses:
                k = (count.netns, count.protocol, count.port)  # the namespace's cookie
                now[k] = now.get(k, 0) + count.misses
                addrs.setdefault(k, set()).add(str(count.address))
        seen, self._misses_seen = self._misses_seen, now
        if seen is None:
            return
        wall = time.time()
        for (cookie, proto, port), n in sorted(now.items()):
            inode = self._inode_of(cookie)
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
                    self._queue(c, [line])

    def _stream_lost(self, events: int, owners: int) -> None:
        line = stream.lost_line(events, owners, time.time(), "ring")
        for c in list(self.subscribers):
            self._queue(c, [line])

    def _find_autobound(self) -> None:
        """UDP sockets bound by an unconnected sendto() (no hook sees that): found in
        the kernel's UDP table when the owner map says some are unannounced."""
        assert self.loaded is not None
        c = self._last_counters or self.loaded.counters()
        silent = c["udp_created"] - c["udp_announced"] - c["udp_silent_gone"] - self._udp_announced_by_us
        if silent <= 0:
            return
        found = self.tracker.find_autobound_udp(self.loaded.udp_entries(), self.loaded.udp_mark_announced)
        self._udp_announced_by_us += len(found)
        if found and self.subscribers:
            now = time.monotonic_ns()
            self._publish(
                [stream.StreamEvent("bind", stream.sock_of_row(r), r.state, now, bind="sendto") for r in found]
            )

    def _check_losses(self) -> dict[str, int]:
        """Events lost to a full ring, or UDP owners to a full map: resync from the kernel.
        Returns the counters it read."""
        assert self.loaded is not None
        c = self._last_counters = self.loaded.counters()
        losses = (c["ringbuf_full"], c["map_full"])
        if losses != self._last_losses:
            log.warning(
                "lost %d events (ring buffer full) and %d UDP owners (map full): resyncing",
                losses[0] - self._last_losses[0],
                losses[1] - self._last_losses[1],
            )
            self._recent_losses.append((time.monotonic(), losses[0] - self._last_losses[0],
                                        losses[1] - self._last_losses[1]))  # fmt: skip
            self._stream_lost(losses[0] - self._last_losses[0], losses[1] - self._last_losses[1])
            self._last_losses = losses
            self.tracker.stats.resyncs += 1
            self.tracker.reconcile(drain=self.drain)
        return c

    def _bpf_programs(self) -> dict[str, bpfstats.Runs]:
        """Each hook's runs and run time. The kernel's counts move only while it counts:
        read them (three syscalls a program, one program per hooked namespace for
        sk_lookup) then, and once after, not at every status and scrape."""
        assert self.loaded is not None
        counting = self.bpf_stats.active or bpfstats.kernel_counting()
        if self._bpf_runs is None or counting or self._bpf_runs_counting:
            self._bpf_runs = bpfstats.by_hook(self.loaded.links)
        self._bpf_runs_counting = counting
        return self._bpf_runs

    def _tcp_generation(self, counters: dict[str, int]) -> int | None:
        """The hooks' count of connection changes; None (read every time) where a TCP
        hook is missing and the count cannot be trusted."""
        assert self.loaded is not None
        return None if IPPROTO_TCP in self.loaded.unwatched else counters.get("tcp_changes")

    def prepare_answer(self, owners: bool = True) -> None:
        """Before answering: every event so far applied, and what hooks cannot see read.
        owners=False leaves the owner rule to the caller (a view applies it to the rows
        it shows)."""
        assert self.loaded is not None
        self.drain()
        self._check_losses()
        self.tracker.forget_dead_namespaces()
        if self.loaded.unwatched:  # degraded: no hook keeps these rows, so the kernel is asked now
            self.tracker.reconcile(drain=self.drain, protocols=self.loaded.unwatched, repair=False)
        self.tracker.resolve_pending()
        self.tracker.sync_connections(self._tcp_generation(self._last_counters))
        if owners:
            self.tracker.fix_owners()
        self._find_autobound()

    # ---- queries ----------------------------------------------------------------------

    # Clients never block the loop: each is non-blocking in the same epoll, with a
    # deadline to send its request and another to read its answer, and a bounded request
    # buffer. An answer is a list of byte strings sent as the socket takes them (the full
    # snapshot is the cached body itself, not a copy). Past a deadline, or beyond
    # MAX_CLIENTS, a client is dropped and counted.

    def _accept(self, listener: socket.socket, http: bool = False) -> None:
        assert self._ep is not None
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: leave it queued, say so once per burst
                log.warning("cannot accept a client: %s", e.strerror)
                self.clients_dropped["accept_failed"] += 1
                return
            conn.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self.clients_dropped["too_many"] += 1
                with contextlib.suppress(OSError):
                    conn.send(encode_header(False, error=f"the agent is serving {MAX_CLIENTS} clients already"))
                conn.close()
                continue
            web = self.settings.web
            if http and web is not None and web.tls is not None:
                # the handshake happens in the first reads, in the loop like any other I/O
                conn = web.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            c = Client(conn, time.monotonic() + REQUEST_SECONDS, poll=self._poll, http=http)
            self.clients[conn.fileno()] = c
            self._ep.register(conn.fileno(), select.EPOLLIN)
            if http:
                continue
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != 0:
                self._answer(c, [encode_header(False, error="only root may query the sockwatch agent")])

    def _on_client(self, c: Client, mask: int) -> None:
        if c.sub is not None:  # a subscriber only reads; anything it sends, or EOF, ends it
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._drop(c)
            elif c.out:
                t0 = time.thread_time()
                self._flush(c)
                self._stream_cpu += time.thread_time() - t0  # sending is the stream's cost too
            return
        if c.out:
            self._flush(c)
            return
        if not mask & select.EPOLLIN:
            self._drop(c)  # hung up or errored before sending a request
            return
        try:
            chunk = c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf))
            while isinstance(c.sock, ssl.SSLSocket) and chunk and c.sock.pending() and len(c.inbuf) < MAX_REQUEST:
                chunk += c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf) - len(chunk))  # decrypted but not yet read
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # (TLS: the handshake is under way)
        except OSError:  # (TLS: a failed handshake, too)
            self._drop(c)
            return
        if not chunk:
            self._drop(c)  # closed without a whole request
            return
        c.inbuf += chunk
        if c.http:
            head, end, _ = c.inbuf.partition(b"\r\n\r\n")
            if end:
                self._answer(c, self._http(bytes(head)))
            elif len(c.inbuf) > MAX_HTTP_REQUEST:
                self.clients_dropped["oversized"] += 1
                self._answer(c, _http_answer(431, b"request header too large\n"))
            return
        line, newline, _ = c.inbuf.partition(b"\n")
        if newline:
            self._answer(c, self._handle(bytes(line), c))
        elif len(c.inbuf) > MAX_REQUEST:
            self.clients_dropped["oversized"] += 1
            self._answer(c, [encode_header(False, error=f"request longer than {MAX_REQUEST} bytes")])

    def _answer(self, c: Client, chunks: list[bytes]) -> None:
        assert self._ep is not None
        c.inbuf.clear()
        c.out = deque(memoryview(b) for b in chunks if b)
        c.deadline = time.monotonic() + ANSWER_SECONDS
        self._ep.modify(c.sock.fileno(), select.EPOLLOUT)
        self._flush(c)

    def _flush(self, c: Client) -> None:
        sent = 0
        while c.out:
            try:
                n = c.sock.send(c.out[0])
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:  # the reader went away
                self._drop(c)
                return
            sent += n
            if n == len(c.out[0]):
                c.out.popleft()
            else:
                c.out[0] = c.out[0][n:]
        if c.sub is None:
            if not c.out:
                self._drop(c)  # answered: the end of the body is the end of the connection
            return
        c.sub.queued -= sent
        if sent:
            c.deadline = time.monotonic() + ANSWER_SECONDS if c.out else math.inf
        assert self._ep is not None
        want = select.EPOLLIN | (select.EPOLLOUT if c.out else 0)
        with contextlib.suppress(OSError):
            self._ep.modify(c.sock.fileno(), want)

    def _drop(self, c: Client) -> None:
        if c in self.subscribers:
            self.subscribers.discard(c)
            self._update_stream_gate()
        fd = c.sock.fileno()
        if self.clients.pop(fd, None) is not None and self._ep is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)
        c.out.clear()
        c.sock.close()

    def _next_deadline(self) -> float:
        return min((c.deadline for c in self.clients.values()), default=math.inf)

    def _expire_clients(self, now: float) -> None:
        for c in [c for c in self.clients.values() if c.deadline <= now]:
            self.clients_dropped["slow_subscriber" if c.sub else "slow_reader" if c.out else "idle"] += 1
            self._drop(c)

    def _handle(self, line: bytes, c: Client | None = None) -> list[bytes]:
        """One request's answer; never raises for anything a client can send."""
        try:
            req = parse_request(line)
            f = flt.from_wire(req.filters)
            handler = {
                "snapshot": self._on_snapshot,
                "events": self._subscribe,
                "view": self._on_view,
                "ports": self._on_ports,
                "status": self._on_status,
                "lookups": self._on_lookups,
                "peers": self._on_peers,
            }[req.op]
            return handler(req, f, c)
        except (ProtocolError, flt.FilterError) as e:
            return [encode_header(False, error=str(e))]
        except Exception:
            # a bug in answering must not take the host's agent down with it
            log.exception("answering a request failed")
            self.clients_dropped["internal_error"] += 1
            return [encode_header(False, error="internal error in the agent (logged)")]

    # One handler per request type: (request, its filters, the client) -> the answer's chunks.

    def _on_snapshot(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.prepare_answer()
        if f.empty:
            return [encode_header(True, partial=self.partial()), self._full_json()]
        rows = self.tracker.snapshot(f)
        return [encode_header(True, rows=len(rows), partial=self.partial()), render_json(rows)]

    def _on_view(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.prepare_answer(owners=False)  # a screenful's owners are checked, not the table's
        return [encode_header(True, partial=self.partial()), self._json(self._view(req, f))]

    def _on_ports(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.prepare_answer()
        return [encode_header(True, partial=self.partial()), self._json(self._ports(f))]

    def _on_lookups(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        why = self._lookup_missing()
        if why:
            return [encode_header(False, error=why)]
        self.prepare_answer()
        dests = lookups.destinations(self.destinations(), self.tracker.visible(), f)
        body = {"destinations": dests[: req.limit], "matched": len(dests),
                "closed_ports": lookups.closed_ports(dests)[: req.limit], "totals": self.lookup_totals()}  # fmt: skip
        return [encode_header(True, partial=self.partial()), self._json(body)]

    def _on_peers(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        why = self._lookup_missing()
        if why:
            return [encode_header(False, error=why)]
        self.prepare_answer()
        found, present = self.peers()
        shown = lookups.peers(found, self.tracker.visible(), f)
        body = {"peers": shown[: req.limit], "matched": len(shown), "totals": self.lookup_totals(present)}
        return [encode_header(True, partial=self.partial()), self._json(body)]

    def _lookup_missing(self) -> str:
        """Why there are no lookup counts, or ''."""
        assert self.loaded is not None
        if self.loaded.lookup is not None:
            return ""
        if self.loaded.lookups_off:
            return "this agent runs with --lookups off: lookups, misses and UDP peers are not counted"
        why = next((m.why for m in self.loaded.missing if m.hook is bpfload.LOOKUP_HOOK), "not attached")
        return f"this agent has no sk_lookup hook ({why}): lookups, misses and UDP peers are not counted"

    def _inode_of(self, cookie: int) -> int | None:
        ns = self.tracker.registry.by_cookie.get(cookie)
        return ns.inode if ns is not None else None

    def destinations(self) -> list[lookups.Destination]:
        """What the sk_lookup hook counted, by namespace inode (read now)."""
        assert self.loaded is not None and self.loaded.lookup is not None
        return [replace(d, netns=inode) for inode, d in lookups.resolve(self.loaded.lookup.counts(), self._inode_of)]

    def peers(self) -> tuple[list[lookups.Peer], int]:
        """The peers kept, by namespace inode and wall time, and how many entries the
        map holds (those of namespaces not yet forgotten included: not evicted)."""
        assert self.loaded is not None and self.loaded.lookup is not None
        read, in_map = self.loaded.lookup.peers()
        kept = [replace(p, netns=inode, last_seen=self.wall_offset + p.last_seen)
                for inode, p in lookups.resolve(read, self._inode_of)]  # fmt: skip
        return kept, in_map

    def _lookup_sample(self) -> metrics.LookupSample | None:
        if self.loaded is None or self.loaded.lookup is None:
            return None
        found, present = self.peers()
        by: dict[tuple[int, str, str], int] = {}
        for p in found:
            k = (p.netns, str(p.local_address), str(p.local_port))
            by[k] = by.get(k, 0) + 1
        t = self.lookup_totals(present)
        return metrics.LookupSample(self.destinations(), by, t["namespaces_hooked"], t["lookups_uncounted"],
                                    t["misses_unattributed"], t["udp_peers_evicted"])  # fmt: skip

    def lookup_totals(self, peers_present: int | None = None) -> dict:
        """The hook's reach and losses. `peers_present`: entries in the peer map, if read."""
        assert self.loaded is not None
        hook = self.loaded.lookup
        c = self.loaded.counters()
        out = {
            "namespaces_hooked": hook.hooked() if hook else 0,
            "namespaces_known": len(self.tracker.registry.by_cookie),
            "namespaces_refused": len(hook.refused) if hook else 0,
            "lookups_uncounted": c.get("lookup_full", 0),
            "misses_unattributed": c.get("miss_unmatched", 0),
            "lookup_keys_capacity": self.settings.max_lookup_keys,
            "udp_peers_capacity": self.settings.max_udp_peers,
            "udp_peers_seen": c.get("peers_new", 0),
            "drop_sites_checked": hook.drop_sites_checked if hook else False,
        }
        if peers_present is not None:
            forgotten = hook.peers_forgotten if hook else 0
            out["udp_peers_evicted"] = max(0, c.get("peers_new", 0) - forgotten - peers_present)
        return out

    def _on_status(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.drain()
        if req.bpf_stats:
            try:
                self.bpf_stats.open(time.monotonic() + req.bpf_stats)
            except OSError as e:
                return [encode_header(False, error=f"the kernel would not count BPF runs: {e.strerror}")]
        if req.reconcile:
            self.prepare_answer()
            self.tracker.reconcile(drain=self.drain)
        return [encode_header(True), self._json(self.status())]

    def _http(self, head: bytes) -> list[bytes]:
        """GET /metrics (built now, from the table as it is) and GET /healthz; nothing
        else. The request is read, not trusted: only its first line matters."""
        web = self.settings.web
        extra = web.headers if web is not None else b""  # the web config's headers, on every answer
        try:
            method, target, _version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
        except (ValueError, UnicodeDecodeError):
            return _http_answer(400, b"bad request\n", extra=extra)
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _http_answer(405, b"only GET\n", extra=extra)
        if path == "/metrics" and web is not None and not web.allows(webconfig.header(head, b"Authorization")):
            self.clients_dropped["unauthorized"] += 1
            return _http_answer(401, b"unauthorized\n", extra=extra + b'WWW-Authenticate: Basic realm="sockwatch"\r\n')
        try:
            if path == "/metrics":
                self.prepare_answer(owners=False)  # the collector checks the owners of what it shows
                body = generate_latest(self.registry)
                return _http_answer(200, body, "text/plain; version=0.0.4; charset=utf-8", head=method == "HEAD",
                                    extra=extra)  # fmt: skip
            if path in ("/healthz", "/readyz"):
                ok = self.loaded is not None and bool(len(self.loaded.links))
                return _http_answer(200 if ok else 503, b"ok\n" if ok else b"no hook attached\n", extra=extra)
        except Exception:
            log.exception("answering %s failed", path)
            self.clients_dropped["internal_error"] += 1
            return _http_answer(500, b"internal error in the agent (logged)\n", extra=extra)
        return _http_answer(404, b"try /metrics or /healthz\n", extra=extra)

    @staticmethod
    def _json(d: dict) -> bytes:
        return json.dumps(d, separators=(",", ":")).encode() + b"\n"

    def _subscribe(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        if c is None:
            raise ProtocolError("'events' needs a connection to stream on")
        self.drain()  # what happened before the subscription is not streamed
        if not self.subscribers:
            self.describer = stream.Describer()
            self._misses_seen = None  # misses from before the stream are not streamed
        c.sub = Subscription(f, frozenset(req.kinds))
        self.subscribers.add(c)
        self._update_stream_gate()
        return [encode_header(True, stream=True, partial=self.partial())]

    def _view(self, req: Request, f: flt.Filters) -> dict:
        by: Counter[tuple[int, int]] = Counter()
        for (_netns, proto, _family, state), n in self.tracker.tally().counts.items():
            by[(proto, state)] += n
        peers = req.view == "peers"
        answer = views.view(self.tracker.visible(), f, "listeners" if peers else req.view, req.sort, req.reverse,
                            0 if peers else req.offset, 0 if peers else req.limit, fix_owners=self.tracker.fix_owners,
                            whole=by)  # fmt: skip
        assert self.loaded is not None
        if peers:  # the live peers view: a window of the peers, most packets first
            found = lookups.peers(self.peers()[0], self.tracker.visible(), f) if self.loaded.lookup is not None else []
            answer["selected"] = len(found)
            answer["peers"] = found[req.offset : req.offset + req.limit]
            answer["peers_note"] = self._lookup_missing()
        c = self._last_counters or self.loaded.counters()
        answer["agent"] = {
            "pid": os.getpid(),
            "last_minute": self.cost.last_minute(self.tracker.stats.events.total(), _cpu_seconds()),
            "lost": {"ring": c.get("ringbuf_full", 0), "udp_owners": c.get("map_full", 0)},
            "subscribers": len(self.subscribers),
            "metrics": self.metrics_url(),
            "degraded": self.loaded.degraded(),
        }
        answer["ports"] = self.tracker.tally().namespace_summary(self.tracker.port_ranges())  # kept as ports change
        return answer

    def _ports(self, f: flt.Filters) -> dict:
        ranges = self.tracker.port_ranges()
        if f.empty:
            t = self.tracker.tally()
            return {"namespaces": t.namespace_summary(ranges), "pressure": t.pressure(ranges)}
        return tally.ports_report(self.tracker.snapshot(f), ranges)

    def partial(self) -> list[str]:
        """What the table may lack or has just had repaired. Losses are repaired before
        any answer (a resync from the kernel, owners from /proc), so this says what
        happened in the last minute and what to change, rather than what is missing."""
        now = time.monotonic()
        why = []
        if self.loaded is not None and self.loaded.missing:
            why.append(self.loaded.degraded())
        ring = sum(r for t, r, _ in self._recent_losses if now - t < LOSS_MEMORY_SECONDS)
        owners = sum(m for t, _, m in self._recent_losses if now - t < LOSS_MEMORY_SECONDS)
        if ring:
            why.append(f"{ring} events did not fit the ring in the last minute: resynced from the kernel "
                       "(raise --ringbuf-pages)")  # fmt: skip
        if owners:
            why.append(f"{owners} UDP sockets found the owner map full (--max-udp {self.settings.max_udp}) in the "
                       "last minute: resynced, owners read from /proc (raise --max-udp)")  # fmt: skip
        if self.tracker.stats.unknown_netns:
            why.append(f"{self.tracker.stats.unknown_netns} events came from namespaces gone before they were read")
        c = self._last_counters
        if c.get("lookup_full"):
            why.append(f"{c['lookup_full']} socket lookups found the counter map full (--max-lookup-keys "
                       f"{self.settings.max_lookup_keys}) and were not counted")  # fmt: skip
        hook = self.loaded.lookup if self.loaded is not None else None
        if hook is not None and not hook.drop_sites_checked:
            why.append("kernel addresses are hidden from the agent (kernel.kptr_restrict; CAP_SYSLOG): a drop for no "
                       "socket outside TCP and UDP (an unanswered ping reply) may count as a lookup miss")  # fmt: skip
        if hook is not None and hook.refused:
            why.append(f"the kernel refused the sk_lookup hook in {len(hook.refused)} namespaces "
                       f"({next(iter(hook.refused.values()))}): their lookups are not counted")  # fmt: skip
        return why

    def _full_json(self) -> bytes:
        """The whole table as JSON, built once per table version."""
        self._json_cache_used = time.monotonic()
        version, body = self._json_cache
        if version != self.tracker.version:
            body = render_json(self.tracker.snapshot())
            self._json_cache = (self.tracker.version, body)
        return body

    def status(self) -> dict:
        assert self.loaded is not None
        t = self.tracker
        counters = self.loaded.counters()
        t.sync_connections(self._tcp_generation(counters))
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "load_seconds": round(self.load_seconds, 3),
            "bootstrap_seconds": round(self.bootstrap_seconds, 3),
            "sockets": sum(1 for r in t.rows.values() if r.visible),
            "rows": len(t.rows),
            "pending": len(t.pending),
            "namespaces": len(t.registry.by_cookie),
            "bpf": counters,
            "bpf_programs": {what: {"runs": r.runs, "run_ns": r.run_ns}
                             for what, r in sorted(self._bpf_programs().items())},
            "bpf_stats_counting": self._bpf_runs_counting,
            "tracker": t.stats.as_dict(),
            "rss_bytes": _rss_bytes(),
            "rss_parts_bytes": _rss_parts(),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
            "last_minute": self.cost.last_minute(self.tracker.stats.events.total(), _cpu_seconds()),
            "ring_bytes_read": self.ring.bytes_read if self.ring else 0,
            "ring_records_skipped": self.ring.skipped if self.ring else 0,
            "links": len(self.loaded.links),
            "lookup": self.lookup_totals() if self.loaded.lookup is not None else None,
            "hooks_missing": [{"hook": m.hook.what, "why": m.why} for m in self.loaded.missing],
            "hooks_lesser": list(self.loaded.lesser),
            "udp_map_entries": len(self.loaded.udp_entries()),
            "clients": len(self.clients),
            "subscribers": len(self.subscribers),
            "metrics": self.metrics_url(),
            "stream_skipped": self.stream_skipped_total + self._stream_skipped,
            "clients_dropped": dict(self.clients_dropped),
            "partial": self.partial(),
        }
