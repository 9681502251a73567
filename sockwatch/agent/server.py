"""`sockwatch serve`: load the BPF programs once, keep the tracker live, answer local
queries. One thread: an epoll loop over the ring buffer and the query socket.

The hooks do not wake the agent per event: it drains the ring every `drain_interval`
(the bound on how stale the table can be between queries), when the BPF side forces a
wakeup because a burst is filling the ring, and before answering any query (so an
answer includes everything that happened before it was asked). What the hooks leave to
a kernel read is read when a query needs it, not per event."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass

from sockwatch import filters as flt
from sockwatch.agent.protocol import MAX_REQUEST, encode_header
from sockwatch.kernel import abi, bpfload, prereq
from sockwatch.kernel.ringbuf import RingReader
from sockwatch.model import render_json
from sockwatch.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass
class Settings:
    socket_path: str
    reconcile_interval: float = 30.0
    drain_interval: float = 0.1
    drop_check_interval: float = 1.0
    max_udp: int = 65536
    ringbuf_pages: int = 4096


class AgentRunning(RuntimeError):
    pass


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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.tracker = Tracker()
        self.loaded: bpfload.Loaded | None = None
        self.ring: RingReader | None = None
        self.listener: socket.socket | None = None
        self._lock_fd = -1
        self._stop = False
        self._last_losses = (0, 0)
        self._udp_announced_by_us = 0
        self.cost = CostWindow()
        self.load_seconds = 0.0
        self.bootstrap_seconds = 0.0
        self._json_cache: tuple[int, bytes] = (-1, b"")

    # ---- start and stop ---------------------------------------------------------------

    def _claim_socket(self) -> socket.socket:
        path = self.settings.socket_path
        d = os.path.dirname(path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.pread(self._lock_fd, 32, 0).decode().strip() or "?"
                raise AgentRunning(f"another sockwatch agent (pid {holder}) is serving {path}") from None
            raise
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            os.unlink(path)  # stale socket of an agent that died (the lock says none runs)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(64)
        s.setblocking(False)
        return s

    def start(self) -> None:
        prereq.require()  # before creating anything: a refused start leaves nothing behind
        self.listener = self._claim_socket()
        t0 = time.monotonic()
        self.loaded = bpfload.load_and_attach(self.settings.max_udp, self.settings.ringbuf_pages)
        self.ring = self.loaded.open_ring(self.settings.ringbuf_pages)
        self.load_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        # Hooks are live from here: the dump sees everything older, events everything newer.
        # Until the dump says which TCP sockets predate us, every TCP release is reported.
        self.loaded.set_config(abi.SW_CFG_PRESTART_COOKIE, 2**64 - 1)
        self.tracker.bootstrap()
        self.loaded.set_config(abi.SW_CFG_PRESTART_COOKIE, self.tracker.max_bootstrap_cookie)
        self.drain()
        self.tracker.fill_owners()
        self.bootstrap_seconds = time.monotonic() - t0
        c = self.loaded.counters()
        self._last_losses = (c["ringbuf_full"], c["map_full"])
        log.info("attached; %d sockets in %d namespaces", len(self.tracker.rows), len(self.tracker.registry.by_inode))

    def stop(self, *_: object) -> None:
        self._stop = True

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass
        if self.loaded is not None:
            self.loaded.close()
        self.tracker.registry.close()
        if self._lock_fd >= 0:
            # still holding the lock: nobody else can be using the file or the directory
            for leftover in (self.settings.socket_path + ".lock",):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            try:
                os.rmdir(os.path.dirname(self.settings.socket_path))
            except OSError:
                pass  # not empty: something else lives there
            os.close(self._lock_fd)

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        assert self.loaded is not None and self.listener is not None and self.ring is not None
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        ep = select.epoll()
        ep.register(self.ring.fd, select.EPOLLIN)
        ep.register(self.listener.fileno(), select.EPOLLIN)
        now = time.monotonic()
        next_drain = now + self.settings.drain_interval
        next_second = now + self.settings.drop_check_interval
        next_reconcile = now + self.settings.reconcile_interval
        while not self._stop:
            timeout = max(0.0, min(next_drain, next_second, next_reconcile) - time.monotonic())
            try:
                ready = ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in ready:
                if fd == self.ring.fd:
                    self.drain()
                else:
                    self._accept()
            now = time.monotonic()
            if now >= next_drain:
                self.drain()
                next_drain = now + self.settings.drain_interval
            if now >= next_second:
                self._check_losses()
                self.cost.sample(self.tracker.stats.events.total(), _cpu_seconds())
                next_second = now + self.settings.drop_check_interval
            if now >= next_reconcile:
                self.tracker.reconcile(drain=self.drain)
                # a full comparison is O(sockets): keep it under 0.5% of one CPU however large the table
                spent = self.tracker.stats.last_reconcile_s
                next_reconcile = time.monotonic() + max(self.settings.reconcile_interval, 200 * spent)
        ep.close()

    def drain(self) -> list:
        """Apply every event the hooks committed so far; returns what changed."""
        if self.ring is None:
            return []
        changes = []
        for batch in self.ring.read():
            changes += self.tracker.apply_batch(batch)
        return changes

    def _check_losses(self) -> dict[str, int]:
        """Events lost to a full ring, or UDP owners to a full map: resync from the kernel.
        Returns the counters it read."""
        assert self.loaded is not None
        c = self.loaded.counters()
        losses = (c["ringbuf_full"], c["map_full"])
        if losses != self._last_losses:
            log.warning(
                "lost %d events (ring buffer full) and %d UDP owners (map full): resyncing",
                losses[0] - self._last_losses[0],
                losses[1] - self._last_losses[1],
            )
            self._last_losses = losses
            self.tracker.stats.resyncs += 1
            self.tracker.reconcile(drain=self.drain)
        return c

    def prepare_answer(self) -> None:
        """Before answering: every event so far applied, and what hooks cannot see read."""
        assert self.loaded is not None
        self.drain()
        c = self._check_losses()
        self.tracker.resolve_pending()
        silent = c["udp_created"] - c["udp_announced"] - c["udp_silent_gone"] - self._udp_announced_by_us
        if silent > 0:
            self._udp_announced_by_us += self.tracker.find_autobound_udp(
                self.loaded.udp_entries(), self.loaded.udp_mark_announced
            )

    # ---- queries ----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            with conn:
                conn.setblocking(True)
                conn.settimeout(10)
                try:
                    self._serve(conn)
                except (OSError, ValueError) as e:
                    log.debug("query failed: %s", e)

    def _serve(self, conn: socket.socket) -> None:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != 0:
            conn.sendall(encode_header(False, error="only root may query the sockwatch agent"))
            return
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        try:
            req = json.loads(buf.split(b"\n", 1)[0])
            op = req["op"]
        except (ValueError, KeyError, TypeError):
            conn.sendall(encode_header(False, error="malformed request"))
            return
        assert self.loaded is not None
        if op == "snapshot":
            try:
                f = flt.from_wire(req.get("filters") or {})
            except flt.FilterError as e:
                conn.sendall(encode_header(False, error=str(e)))
                return
            self.prepare_answer()
            if f.empty:
                body = self._full_json()
                conn.sendall(encode_header(True))
                conn.sendall(body)
            else:
                rows = self.tracker.snapshot(f)
                conn.sendall(encode_header(True, rows=len(rows)) + render_json(rows))
        elif op == "status":
            self.drain()
            if req.get("reconcile"):
                self.prepare_answer()
                self.tracker.reconcile(drain=self.drain)
            conn.sendall(encode_header(True) + json.dumps(self.status()).encode() + b"\n")
        else:
            conn.sendall(encode_header(False, error=f"unknown request {op!r}"))

    def _full_json(self) -> bytes:
        """The whole table as JSON, built once per table version."""
        version, body = self._json_cache
        if version != self.tracker.version:
            body = render_json(self.tracker.snapshot())
            self._json_cache = (self.tracker.version, body)
        return body

    def status(self) -> dict:
        assert self.loaded is not None
        t = self.tracker
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "load_seconds": round(self.load_seconds, 3),
            "bootstrap_seconds": round(self.bootstrap_seconds, 3),
            "sockets": sum(1 for r in t.rows.values() if r.visible),
            "rows": len(t.rows),
            "pending": len(t.pending),
            "namespaces": len(t.registry.by_inode),
            "bpf": self.loaded.counters(),
            "tracker": t.stats.as_dict(),
            "rss_bytes": _rss_bytes(),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
            "last_minute": self.cost.last_minute(self.tracker.stats.events.total(), _cpu_seconds()),
            "ring_bytes_read": self.ring.bytes_read if self.ring else 0,
            "links": len(self.loaded.link_fds),
        }
