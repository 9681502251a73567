"""The agent's clients: local queries on its UNIX socket, scrapers on the metrics port,
and subscribers streaming events.

Clients never block the agent's loop: each is non-blocking in the loop's epoll, with a
deadline to send its request and another to read its answer, and a bounded request
buffer. An answer is a list of byte strings sent as the socket takes them (the full
snapshot is the cached body itself, not a copy). Past a deadline a client is dropped
and counted.

Root's UNIX socket and the metrics port have a client count each: connections to the
metrics port (any local user can open them) never take root's. The metrics port holds
at most MAX_HTTP connections, MAX_HTTP_PER_SOURCE from one address; past either, a new
connection takes the place of the one that has waited longest without sending a whole
request (a slowloris is shed, a probe that asks at once is answered). Only when every
connection there is being answered is a new one refused. What a request means is the caller's
(`handle` for a local request line, `http` for a scraper's request head).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import ssl
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sockwatch import filters as flt
from sockwatch.agent import http, webconfig
from sockwatch.agent.protocol import MAX_REQUEST, encode_header

log = logging.getLogger(__name__)

REQUEST_SECONDS = 5.0  # to send one request line
KEEPALIVE_SECONDS = 150.0  # a scraper's connection, idle between scrapes (intervals are up to 2 minutes)
ANSWER_SECONDS = 60.0  # to read one whole answer (a 100,000-row snapshot is ~30 MB)
MAX_CLIENTS = 64  # on the UNIX socket (root's)
MAX_HTTP = 64  # on the metrics port
MAX_HTTP_PER_SOURCE = 16  # from one address (loopback alone has 16 M of them: the cap above is the bound)
STREAM_BUFFER = 8 * 2**20  # a subscriber that falls this far behind is dropped


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
    source: str = ""  # a scraper's address
    accepted: float = 0.0
    keep: bool = False  # a scraper's connection stays open once this answer is sent
    served: int = 0  # answers sent on this connection
    cert_checked: bool = False  # TLS: the client certificate's SANs were checked


Handler = Callable[[bytes, Client], list[bytes]]


class Clients:
    """Every connected client, by file descriptor, in the loop's epoll."""

    def __init__(self, web: webconfig.Watched | None) -> None:
        self.web = web
        self.by_fd: dict[int, Client] = {}
        self.dropped: Counter[str] = Counter()  # why clients were dropped
        self.ep: select.epoll | None = None  # the loop's, while it runs
        self.poll = 0  # the loop's round
        self.handle: Handler = lambda _line, _c: [encode_header(False, error="not ready")]
        self.http: Callable[[bytes], tuple[list[bytes], bool]] = lambda _head: (http.answer(503, b"not ready\n"), False)
        self.on_drop: Callable[[Client], None] = lambda _c: None  # a subscriber leaves
        self.charge_stream: Callable[[float], None] = lambda _s: None  # sending to subscribers is the stream's CPU

    def __len__(self) -> int:
        return len(self.by_fd)

    def get(self, fd: int) -> Client | None:
        return self.by_fd.get(fd)

    def accept(self, listener: socket.socket, is_http: bool = False) -> None:
        assert self.ep is not None
        while True:
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: leave it queued, say so once per burst
                log.warning("cannot accept a client: %s", e.strerror)
                self.dropped["accept_failed"] += 1
                return
            conn.setblocking(False)
            source = str(peer[0]) if is_http and isinstance(peer, tuple) else ""
            if is_http and not self._room_for(source):
                self.dropped["too_many"] += 1
                if self.web is None or self.web.cfg.tls is None:  # (a TLS client would read no HTTP)
                    with contextlib.suppress(OSError):
                        conn.send(b"".join(http.answer(503, b"the metrics port is busy answering\n")))
                conn.close()
                continue
            if not is_http and sum(1 for c in self.by_fd.values() if not c.http) >= MAX_CLIENTS:
                self.dropped["too_many"] += 1
                with contextlib.suppress(OSError):
                    conn.send(encode_header(False, error=f"the agent is serving {MAX_CLIENTS} clients already"))
                conn.close()
                continue
            web = self.web.current() if is_http and self.web is not None else None  # (read again if its files changed)
            if web is not None and web.tls is not None:
                # the handshake happens in the first reads, in the loop like any other I/O
                conn = web.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            now = time.monotonic()
            c = Client(conn, now + REQUEST_SECONDS, poll=self.poll, http=is_http, source=source, accepted=now)
            self.by_fd[conn.fileno()] = c
            self.ep.register(conn.fileno(), select.EPOLLIN)
            if is_http:
                continue
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != 0:
                self.answer(c, [encode_header(False, error="only root may query the sockwatch agent")])

    def _room_for(self, source: str) -> bool:
        """Whether the metrics port can take one more connection from `source`, making
        room by dropping the connection there that has waited longest for its request."""
        scrapers = [c for c in self.by_fd.values() if c.http]
        same = [c for c in scrapers if c.source == source]
        if len(same) >= MAX_HTTP_PER_SOURCE:
            pool, why = same, "too_many_from_source"
        elif len(scrapers) >= MAX_HTTP:
            pool, why = scrapers, "evicted"
        else:
            return True
        waiting = [c for c in pool if not c.out]  # no whole request yet
        if not waiting:
            return False
        self.dropped[why] += 1
        self.drop(min(waiting, key=lambda c: c.accepted))
        return True

    def on_ready(self, c: Client, mask: int) -> None:
        if c.sub is not None:  # a subscriber only reads; anything it sends, or EOF, ends it
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.drop(c)
            elif c.out:
                t0 = time.thread_time()
                self.flush(c)
                self.charge_stream(time.thread_time() - t0)
            return
        if c.out:
            self.flush(c)
            return
        if not mask & select.EPOLLIN:
            self.drop(c)  # hung up or errored before sending a request
            return
        try:
            chunk = c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf))
            while isinstance(c.sock, ssl.SSLSocket) and chunk and c.sock.pending() and len(c.inbuf) < MAX_REQUEST:
                chunk += c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf) - len(chunk))  # decrypted but not yet read
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # (TLS: the handshake is under way)
        except OSError:  # (TLS: a failed handshake, too)
            self.drop(c)
            return
        if not chunk:
            self.drop(c)  # closed without a whole request (or, kept alive, with no other)
            return
        if isinstance(c.sock, ssl.SSLSocket) and not c.cert_checked:  # the handshake is done: who is it?
            c.cert_checked = True
            if self.web is not None and not self.web.cfg.client_allowed(c.sock.getpeercert()):
                self.dropped["client_certificate"] += 1
                self.drop(c)
                return
        c.inbuf += chunk
        if c.http:
            self._http_request(c)
            return
        line, newline, _ = c.inbuf.partition(b"\n")
        if newline:
            self.answer(c, self.handle(bytes(line), c))
        elif len(c.inbuf) > MAX_REQUEST:
            self.dropped["oversized"] += 1
            self.answer(c, [encode_header(False, error=f"request longer than {MAX_REQUEST} bytes")])

    def _http_request(self, c: Client) -> None:
        """A scraper's next request, if its head has come whole (what follows it stays
        for the next: a pipelined request)."""
        end = http.head_end(c.inbuf)
        if end >= 0:
            head = bytes(c.inbuf[:end])
            del c.inbuf[: http.head_length(c.inbuf, end)]
            chunks, keep = self.http(head)
            self.answer(c, chunks, keep)
        elif len(c.inbuf) > http.MAX_REQUEST:
            self.dropped["oversized"] += 1
            self.answer(c, http.answer(431, b"request header too large\n"))

    def answer(self, c: Client, chunks: list[bytes], keep: bool = False) -> None:
        assert self.ep is not None
        if not c.http:
            c.inbuf.clear()
        c.keep = keep
        c.out = deque(memoryview(b) for b in chunks if b)
        c.deadline = time.monotonic() + ANSWER_SECONDS
        self.ep.modify(c.sock.fileno(), select.EPOLLOUT)
        self.flush(c)

    def queue(self, c: Client, chunks: list[bytes]) -> None:
        """Queue lines for a subscriber and send what its socket takes now; one that has
        fallen STREAM_BUFFER behind is dropped (and counted), never waited for."""
        if not chunks or c.sub is None:
            return
        c.sub.queued += sum(map(len, chunks))
        if c.sub.queued > STREAM_BUFFER:
            self.dropped["slow_subscriber"] += 1
            self.drop(c)
            return
        if not c.out:
            c.deadline = time.monotonic() + ANSWER_SECONDS
        c.out.extend(map(memoryview, chunks))
        self.flush(c)

    def flush(self, c: Client) -> None:
        sent = 0
        while c.out:
            try:
                n = c.sock.send(c.out[0])
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:  # the reader went away
                self.drop(c)
                return
            sent += n
            if n == len(c.out[0]):
                c.out.popleft()
            else:
                c.out[0] = c.out[0][n:]
        if c.sub is None:
            if not c.out:
                if c.keep:  # answered, and the scraper keeps the connection for its next scrape
                    self._next_request(c)
                else:
                    self.drop(c)  # answered: the end of the body is the end of the connection
            return
        c.sub.queued -= sent
        if sent:
            c.deadline = time.monotonic() + ANSWER_SECONDS if c.out else math.inf
        if self.ep is not None:
            want = select.EPOLLIN | (select.EPOLLOUT if c.out else 0)
            with contextlib.suppress(OSError):
                self.ep.modify(c.sock.fileno(), want)

    def _next_request(self, c: Client) -> None:
        assert self.ep is not None
        c.keep = False
        c.served += 1
        c.deadline = time.monotonic() + (KEEPALIVE_SECONDS if not c.inbuf else REQUEST_SECONDS)
        with contextlib.suppress(OSError):
            self.ep.modify(c.sock.fileno(), select.EPOLLIN)
        if c.inbuf:
            self._http_request(c)  # (one was sent before this answer ended)

    def drop(self, c: Client) -> None:
        if c.sub is not None:
            self.on_drop(c)
        fd = c.sock.fileno()
        if self.by_fd.pop(fd, None) is not None and self.ep is not None:
            with contextlib.suppress(OSError):
                self.ep.unregister(fd)
        c.out.clear()
        c.sock.close()

    def drop_all(self) -> None:
        for c in list(self.by_fd.values()):
            self.drop(c)

    def next_deadline(self) -> float:
        return min((c.deadline for c in self.by_fd.values()), default=math.inf)

    def expire(self, now: float) -> None:
        for c in [c for c in self.by_fd.values() if c.deadline <= now]:
            if c.served and not c.out and not c.inbuf:  # a kept-alive scraper that did not come back: routine
                self.dropped["keepalive_idle"] += 1
            else:
                self.dropped["slow_subscriber" if c.sub else "slow_reader" if c.out else "idle"] += 1
            self.drop(c)
