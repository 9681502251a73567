"""The metrics port: GET /metrics (built when scraped, from the table as it is; the path
is --web.telemetry-path) and GET /healthz, nothing else. A request head is read, not
trusted: its first line, and the headers that choose the answer's form (Accept,
Accept-Encoding), its connection's (Connection, and the body headers: a request with
a body is answered and the connection closed) and, with basic auth, Authorization.
HTTP/1.1 connections stay open between scrapes (keep-alive: no TLS handshake a scrape)."""

from __future__ import annotations

import gzip
import logging
import time
from collections import Counter
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sockwatch.agent import webconfig

log = logging.getLogger(__name__)

MAX_REQUEST = 8192  # bytes of request head
GZIP_FROM = 1024  # bytes of body: smaller answers go as they are
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def head_end(buf: bytes | bytearray) -> int:
    """Where a request head ends (its blank line: CRLF CRLF, or bare LFs, which RFC 9112
    lets a server take as line ends), or -1 while it has not come whole."""
    ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


def head_length(buf: bytes | bytearray, end: int) -> int:
    """The bytes a request head at head_end() `end` takes, its blank line included."""
    return end + (4 if buf[end : end + 4] == b"\r\n\r\n" else 2)


def keeps_alive(head: bytes) -> bool:
    """Whether the connection may carry another request after this one's answer:
    HTTP/1.1 unless it says close, HTTP/1.0 only if it says keep-alive, and never after
    a request with a body (this server reads none, so it could not find the next)."""
    first = head.split(b"\n", 1)[0].removesuffix(b"\r")
    if webconfig.header(head, b"Transfer-Encoding") is not None:
        return False
    if (webconfig.header(head, b"Content-Length") or "0").strip() != "0":
        return False
    tokens = {t.strip().lower() for t in (webconfig.header(head, b"Connection") or "").split(",")}
    if first.endswith(b" HTTP/1.1"):
        return "close" not in tokens
    return first.endswith(b" HTTP/1.0") and "keep-alive" in tokens


def answer(
    status: int,
    body: bytes,
    ctype: str = "text/plain; charset=utf-8",
    head: bool = False,
    extra: bytes = b"",
    keep: bool = False,
) -> list[bytes]:
    top = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
           f"Connection: {'keep-alive' if keep else 'close'}\r\n").encode() + extra + b"\r\n"  # fmt: skip
    return [top] if head else [top, body]


class Bucket:
    """rate_limit: a token bucket of `burst` requests, one more every `interval` seconds."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = interval, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) / self.interval)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class MetricsEndpoint:
    """Answers one scraper's request head. `prepare` brings the table up to date before
    a scrape; `healthy` says whether any hook is attached; `dropped` counts refusals."""

    def __init__(
        self,
        registry: CollectorRegistry,
        web: webconfig.Watched | None,
        prepare: Callable[[], None],
        healthy: Callable[[], bool],
        dropped: Counter[str],
        path: str = "/metrics",
    ) -> None:
        self.registry = registry
        self.web = web
        self.prepare = prepare
        self.healthy = healthy
        self.dropped = dropped
        self.path = path
        self._bucket: tuple[webconfig.WebConfig, Bucket] | None = None

    def __call__(self, head: bytes) -> tuple[list[bytes], bool]:
        """The answer's chunks, and whether the connection stays open after them."""
        web = self.web.current() if self.web is not None else None
        extra = web.headers if web is not None else b""  # the web config's headers, on every answer
        try:
            method, target, _version = head.split(b"\n", 1)[0].removesuffix(b"\r").decode("ascii").split(" ")
        except (ValueError, UnicodeDecodeError):
            return answer(400, b"bad request\n", extra=extra), False
        keep = keeps_alive(head)
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return answer(405, b"only GET\n", extra=extra), False
        if web is not None and web.rate[0] > 0 and not self._allowed(web):
            self.dropped["rate_limited"] += 1
            return answer(429, b"too many requests\n", extra=extra, keep=keep), keep
        status, got = self._route(path, head, extra, web, keep)
        keep = keep and status < 500
        return (got[:1] if method == "HEAD" else got), keep  # HEAD: the same head, no body (RFC 9110 9.3.2)

    def _allowed(self, web: webconfig.WebConfig) -> bool:
        if self._bucket is None or self._bucket[0] is not web:  # a new config: a new bucket
            self._bucket = (web, Bucket(*web.rate))
        return self._bucket[1].take(time.monotonic())

    def _route(
        self, path: str, head: bytes, extra: bytes, web: webconfig.WebConfig | None, keep: bool
    ) -> tuple[int, list[bytes]]:
        if path == self.path and web is not None and not web.allows(webconfig.header(head, b"Authorization")):
            self.dropped["unauthorized"] += 1
            return 401, answer(401, b"unauthorized\n", keep=keep,
                               extra=extra + b'WWW-Authenticate: Basic realm="sockwatch"\r\n')  # fmt: skip
        try:
            if path == self.path:
                self.prepare()
                # OpenMetrics when the scraper asks for it (Accept), as exporters negotiate
                encode, ctype = choose_encoder(webconfig.header(head, b"Accept") or "")
                body = encode(self.registry)
                if len(body) >= GZIP_FROM and "gzip" in (webconfig.header(head, b"Accept-Encoding") or "").lower():
                    body = gzip.compress(body, 6)
                    extra += b"Content-Encoding: gzip\r\n"
                return 200, answer(200, body, ctype, extra=extra + b"Vary: Accept, Accept-Encoding\r\n", keep=keep)
            if path in ("/healthz", "/readyz"):
                ok = self.healthy()
                status = 200 if ok else 503
                return status, answer(status, b"ok\n" if ok else b"no hook attached\n", extra=extra, keep=keep and ok)
        except Exception:
            log.exception("answering %s failed", path)
            self.dropped["internal_error"] += 1
            return 500, answer(500, b"internal error in the agent (logged)\n", extra=extra)
        return 404, answer(404, f"try {self.path} or /healthz\n".encode(), extra=extra, keep=keep)
