"""`sockwatch serve`: load the BPF programs once, keep the tracker live, answer local
queries. One thread: an epoll loop over the ring buffer and the query socket, with
timers for reading what hooks cannot see, drop checks, and the periodic reconcile."""

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
from dataclasses import dataclass

from sockwatch import filters as flt
from sockwatch.agent.protocol import MAX_REQUEST, encode_header
from sockwatch.kernel import bpfload, prereq
from sockwatch.model import render_json
from sockwatch.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass
class Settings:
    socket_path: str
    reconcile_interval: float = 30.0
    resolve_interval: float = 0.2
    drop_check_interval: float = 1.0
    max_socks: int = 262144
    ringbuf_pages: int = 4096


class AgentRunning(RuntimeError):
    pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.tracker = Tracker()
        self.loaded: bpfload.Loaded | None = None
        self.listener: socket.socket | None = None
        self._lock_fd = -1
        self._stop = False
        self._last_drops = 0
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
        self.loaded = bpfload.load_and_attach(self.settings.max_socks, self.settings.ringbuf_pages)
        self.load_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        # hooks are live from here: the dump sees everything older, events everything newer
        self.tracker.bootstrap(self.loaded.read_table())
        self.bootstrap_seconds = time.monotonic() - t0
        self._rb_fd = self.loaded.open_events(self.tracker.apply)
        self.loaded.consume()
        self._last_drops = self.loaded.counters()["ringbuf_full"]
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
        assert self.loaded is not None and self.listener is not None
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        ep = select.epoll()
        ep.register(self._rb_fd, select.EPOLLIN)
        ep.register(self.listener.fileno(), select.EPOLLIN)
        now = time.monotonic()
        next_resolve = now + self.settings.resolve_interval
        next_drops = now + self.settings.drop_check_interval
        next_reconcile = now + self.settings.reconcile_interval
        while not self._stop:
            timeout = max(0.0, min(next_resolve, next_drops, next_reconcile) - time.monotonic())
            try:
                ready = ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in ready:
                if fd == self._rb_fd:
                    self.loaded.consume()
                else:
                    self._accept()
            now = time.monotonic()
            if now >= next_resolve:
                self.loaded.consume()
                t0 = time.monotonic()
                self.tracker.resolve_pending()
                # a dump at 100k sockets is not free: never spend more than a third of the time on it
                next_resolve = now + max(self.settings.resolve_interval, 2 * (time.monotonic() - t0))
            if now >= next_drops:
                self._check_drops()
                next_drops = now + self.settings.drop_check_interval
            if now >= next_reconcile:
                self.tracker.reconcile(drain=self.loaded.consume)
                # a full comparison is O(sockets): keep it under 0.5% of one CPU however large the table
                spent = self.tracker.stats.last_reconcile_s
                next_reconcile = time.monotonic() + max(self.settings.reconcile_interval, 200 * spent)
        ep.close()

    def _check_drops(self) -> None:
        """Events lost to a full ring buffer: the map still has the truth, resync from it."""
        assert self.loaded is not None
        drops = self.loaded.counters()["ringbuf_full"]
        if drops != self._last_drops:
            log.warning("%d events lost (ring buffer full): resyncing", drops - self._last_drops)
            self._last_drops = drops
            self.tracker.stats.resyncs += 1
            self.tracker.reconcile(drain=self.loaded.consume)

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
        self.loaded.consume()  # everything that happened before the question is in the answer
        if op == "snapshot":
            try:
                f = flt.from_wire(req.get("filters") or {})
            except flt.FilterError as e:
                conn.sendall(encode_header(False, error=str(e)))
                return
            self.tracker.resolve_pending()
            if f.empty:
                body = self._full_json()
                conn.sendall(encode_header(True))
                conn.sendall(body)
            else:
                rows = self.tracker.snapshot(f)
                conn.sendall(encode_header(True, rows=len(rows)) + render_json(rows))
        elif op == "status":
            if req.get("reconcile"):
                self.tracker.reconcile(drain=self.loaded.consume)
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
            "links": len(self.loaded.link_fds),
        }
