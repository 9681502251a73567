"""`sockwatch serve`: load the BPF programs once, keep the tracker live, answer local
queries. One thread: an epoll loop over the ring buffer, the query socket and the
clients (clients.py); answers are queries.py's, the stream publisher.py's, the metrics
port http.py's, what the agent says of itself report.py's.

The hooks do not wake the agent per event: it drains the ring every `drain_interval`
(the bound on how stale the table can be between queries), when the BPF side forces a
wakeup because a burst is filling the ring, and before answering any query (so an
answer includes everything that happened before it was asked). What the hooks leave to
a kernel read is read when a query needs it, not per event: TCP connections above all,
whose records reach the ring only while a subscriber streams them (the publisher's
gate)."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from sockwatch import containers, metric_limits, metrics
from sockwatch.agent import http, report, sockpath, webconfig
from sockwatch.agent.clients import Clients
from sockwatch.agent.notify import Notifier
from sockwatch.agent.publisher import Publisher
from sockwatch.agent.queries import Queries
from sockwatch.kernel import bpfload, prereq, syscalls
from sockwatch.kernel.ringbuf import RingReader
from sockwatch.model import IPPROTO_TCP
from sockwatch.table import Tracker
from sockwatch.table.rules import Change

log = logging.getLogger(__name__)

TRIM_SECONDS = 30.0


@dataclass
class Settings:
    socket_path: str
    reconcile_interval: float = 30.0
    drain_interval: float = 0.1
    drop_check_interval: float = 1.0
    ringbuf_pages: int = 1024  # 4 MiB: records cross only for binds, listens and while someone streams
    max_lookup_keys: int = 16384
    max_udp_peers: int = 16384
    lookups: bool = True  # the sk_lookup hook in every namespace (serve --lookups)
    max_lookup_namespaces: int = 512  # namespaces given it: a program each, and any user can make namespaces
    stream_cpu: float = 0.25  # seconds of CPU per second the event stream may take; past it, it skips and says so
    listen: tuple[str, int] | None = ("127.0.0.1", metric_limits.DEFAULT_PORT)  # /metrics and /healthz; None: off
    metrics_limits: metric_limits.Limits = field(default_factory=metric_limits.Limits)
    kubelet_log_dir: str = "/var/log"  # pods/ and containers/ name Kubernetes pods and containers
    web: webconfig.WebConfig | None = None  # TLS and basic auth for the metrics port
    web_config_path: str = ""  # where `web` was read from: read again when it changes, and at SIGHUP
    telemetry_path: str = "/metrics"  # where the metrics are served (--web.telemetry-path)


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
        # the web config in use, read again when its files change (and at SIGHUP)
        self.web = webconfig.Watched(settings.web_config_path, settings.web) if settings.web is not None else None
        self.clients = Clients(self.web)
        self.publisher = Publisher(self.tracker, self.clients, settings.stream_cpu)
        self.queries = Queries(self)
        self.clients.handle = self.queries
        self.clients.http = self.metrics_endpoint = http.MetricsEndpoint(
            self.registry,
            self.web,
            prepare=lambda: self.prepare_answer(owners=False),  # the collector checks the owners of what it shows
            healthy=lambda: self.loaded is not None and bool(len(self.loaded.links)),
            dropped=self.clients.dropped,
            path=settings.telemetry_path,
        )
        self.cost = report.CostWindow()
        self.hook_runs = report.HookRuns()  # the kernel's run counts, on only while asked
        self.load_seconds = 0.0
        self.bootstrap_seconds = 0.0
        self.last_counters: dict[str, int] = {}
        self.recent_losses: deque[tuple[float, int]] = deque(maxlen=64)  # (when, records the ring lost)
        self._last_lost = 0
        self._stop = False
        self._reload = False
        self.notifier = Notifier()
        self._next_watchdog = 0.0

    # ---- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        prereq.require()  # before creating anything: a refused start leaves nothing behind
        syscalls.one_malloc_arena()
        self.claim = sockpath.claim(self.settings.socket_path)
        self.listener = self.claim.listener
        if self.settings.listen is not None:
            self.http_listener = self._listen_http(self.settings.listen)
        t0 = time.monotonic()
        st = self.settings
        self.loaded = bpfload.load_and_attach(
            bpfload.Sizes(st.ringbuf_pages, st.max_lookup_keys, st.max_udp_peers),
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
        self.publisher.set_gate = self.loaded.set_stream
        self.publisher.set_hooks = self._stream_hooks
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
        report.give_back_memory()
        bpfload.release_compiler_pages()
        self._last_lost = self.loaded.counters()["ringbuf_full"]
        log.info("attached; %d sockets in %d namespaces", len(self.tracker.rows), len(self.tracker.registry.by_cookie))

    def _listen_http(self, where: tuple[str, int]) -> socket.socket:
        host, port = where
        family = socket.AF_INET6 if ":" in host or not host else socket.AF_INET
        try:
            s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError:
            if host:
                raise
            host, family = "0.0.0.0", socket.AF_INET  # ":PORT" on a host without IPv6
            s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        if not host and family == socket.AF_INET6:
            host = "::"
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # ":PORT": IPv4 too, whatever bindv6only says
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise sockpath.ListenError(f"cannot listen for metrics on {host}:{port}: {e.strerror}") from None
        s.listen(64)
        self.metrics_address = f"[{host}]:{s.getsockname()[1]}" if ":" in host else f"{host}:{s.getsockname()[1]}"
        self.collector = metrics.SockwatchCollector(
            tally=self.tracker.tally,
            port_ranges=self.tracker.port_ranges,
            bind_failures=lambda: dict(self.tracker.stats.bind_failures),
            binds=lambda: dict(self.tracker.stats.binds),
            health=lambda: report.health(self),
            limits=self.settings.metrics_limits,
            fix_owners=self.tracker.fix_owners,
            lookups=self.queries.lookup_sample,
            drops=self.queries.drop_sample,
        )
        self.registry.register(self.collector)
        # process_* (memory, CPU, file descriptors, start time) and python_info, as every exporter has
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        return s

    def metrics_url(self) -> str | None:
        if not self.metrics_address:
            return None
        tls = self.settings.web is not None and self.settings.web.tls is not None
        return f"{'https' if tls else 'http'}://{self.metrics_address}{self.settings.telemetry_path}"

    def stop(self, *_: object) -> None:
        self._stop = True

    def close(self) -> None:
        self.hook_runs.window.close()
        self.clients.drop_all()
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
            signal.signal(signal.SIGHUP, self._ask_reload)  # reload what can be; never the end of the agent
        self.notifier.send(f"READY=1\nSTATUS=serving {self.settings.socket_path}; metrics "
                           f"{self.metrics_address or 'off'}\nMAINPID={os.getpid()}")  # fmt: skip
        ep = self.clients.ep = select.epoll()
        ep.register(self.ring.fd, select.EPOLLIN)
        ep.register(self.listener.fileno(), select.EPOLLIN)
        if self.http_listener is not None:
            ep.register(self.http_listener.fileno(), select.EPOLLIN)
        clients = self.clients
        now = time.monotonic()
        next_drain = now + self.settings.drain_interval
        next_second = now + self.settings.drop_check_interval
        next_reconcile = now + self.settings.reconcile_interval
        next_trim = now + TRIM_SECONDS
        while not self._stop:
            if self._reload:
                self._reload = False
                self.reload()
            timeout = max(0.0, min(next_drain, next_second, next_reconcile, clients.next_deadline()) - time.monotonic())
            try:
                ready = ep.poll(timeout)
            except InterruptedError:
                continue
            clients.poll += 1
            for fd, mask in ready:
                if fd == self.ring.fd:
                    self.drain()
                elif fd == self.listener.fileno():
                    clients.accept(self.listener)
                elif self.http_listener is not None and fd == self.http_listener.fileno():
                    clients.accept(self.http_listener, is_http=True)
                elif (c := clients.get(fd)) is not None and c.poll != clients.poll:
                    clients.on_ready(c, mask)
            now = time.monotonic()
            clients.expire(now)
            if now >= next_drain:
                self.drain()
                next_drain = now + self.settings.drain_interval
            if now >= next_second:
                self._second(now)
                if now >= next_trim:
                    report.give_back_memory()  # what bursts of answers and batch map reads freed
                    next_trim = now + TRIM_SECONDS
                next_second = now + self.settings.drop_check_interval
            if now >= next_reconcile:
                self._read_unhooked()  # what reads adopt is not a repair
                self.tracker.reconcile(drain=self.drain)
                # a full comparison is O(sockets): keep it under 0.5% of one CPU however large the table
                spent = self.tracker.stats.last_reconcile_s
                next_reconcile = time.monotonic() + max(self.settings.reconcile_interval, 200 * spent)
        self.notifier.send("STOPPING=1")
        clients.drop_all()
        clients.ep = None
        ep.close()

    def _ask_reload(self, *_: object) -> None:
        self._reload = True

    def reload(self) -> None:
        """SIGHUP: the web config read again (a rotated certificate, new users); if it
        does not load now, the one in use stays, and the log says why."""
        self.notifier.send("RELOADING=1")
        if self.web is not None:
            self.web.reload("SIGHUP")
        self.notifier.send("READY=1")

    def _second(self, now: float) -> None:
        """What the loop does once a second."""
        assert self.loaded is not None
        if self.notifier.watchdog is not None and now >= self._next_watchdog:
            self.notifier.send("WATCHDOG=1")  # the loop turns: it answers within a second
            self._next_watchdog = now + self.notifier.watchdog
        self.hook_runs.window.close_if_over(now)
        self._check_losses()
        self.tracker.forget_dead_namespaces()
        self._follow_namespaces()
        streaming = bool(self.publisher.subscribers)
        if streaming:
            self._read_unhooked()  # subscribers hear of sendto() binds within a second
        self.publisher.second()
        if streaming and self.loaded.lookup is not None:
            self.publisher.misses(self.loaded.lookup.counts(), self.queries.inode_of)
        if streaming:
            self.publisher.drops(self.queries.socket_drops())  # (the read above gave each socket's sk_drops)
        if self.collector is not None:
            self.tracker.tally()  # follow changes each second, so that a scrape finds few
        self.queries.forget_cache(now)
        self.cost.sample(self.tracker.stats.events.total(), report.cpu_seconds())

    def _follow_namespaces(self) -> None:
        """Find namespaces created since the last tick and give each the lookup hook;
        release the hooks of those gone (forget_dead_namespaces found them)."""
        if self.loaded is None or self.loaded.lookup is None:
            return
        self.tracker.registry.refresh()
        attached, released = self.loaded.lookup.follow(self.tracker.registry, self.settings.max_lookup_namespaces)
        if attached or released:
            log.info("sk_lookup: attached to %d namespaces, released %d", attached, released)

    def drain(self) -> list[Change]:
        """Apply every event the hooks committed so far; returns what changed."""
        if self.ring is None:
            return []
        changes = []
        for batch in self.ring.read():
            if self.publisher.subscribers:
                changes += self.publisher.apply(batch)
            else:
                changes += self.tracker.apply_batch(batch)
        return changes

    def _read_unhooked(self) -> None:
        """UDP sockets and listeners read from the kernel; sendto() binds it found told
        to subscribers, with their owners (from /proc: no hook saw them bind)."""
        added = self.tracker.read_unhooked(drain=self.drain)
        if added and self.publisher.subscribers:
            self.tracker.fix_owners(added)
            self.publisher.autobound(added)

    def _stream_hooks(self, on: bool) -> None:
        assert self.loaded is not None
        for why in self.loaded.stream_hooks(on):
            log.warning("the event stream runs without %s", why)

    def _check_losses(self) -> dict[str, int]:
        """Events lost to a full ring: resync from the kernel. Returns the counters it read."""
        assert self.loaded is not None
        c = self.last_counters = self.loaded.counters()
        if c["ringbuf_full"] != self._last_lost:
            lost = c["ringbuf_full"] - self._last_lost
            log.warning("lost %d events (ring buffer full): resyncing", lost)
            self.recent_losses.append((time.monotonic(), lost))
            self.publisher.lost(lost)
            self._last_lost = c["ringbuf_full"]
            self.tracker.stats.resyncs += 1
            self.tracker.reconcile(drain=self.drain)
        return c

    def tcp_generation(self, counters: dict[str, int]) -> int | None:
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
        self._read_unhooked()  # UDP sockets and listeners: read, as no hook on every close keeps them
        self.tracker.resolve_pending()
        self.tracker.sync_connections(self.tcp_generation(self.last_counters))
        self.tracker.name_devices()  # (only rows bound to a device not yet named)
        if owners:
            self.tracker.fix_owners()
