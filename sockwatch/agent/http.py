"""The metrics port: GET /metrics (built when scraped, from the table as it is) and GET
/healthz, nothing else. A request head is read, not trusted: only its first line and,
with basic auth configured, its Authorization header matter."""

from __future__ import annotations

import gzip
import logging
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
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def head_end(buf: bytes | bytearray) -> int:
    """Where a request head ends (its blank line: CRLF CRLF, or bare LFs, which RFC 9112
    lets a server take as line ends), or -1 while it has not come whole."""
    ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


def answer(
    status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", head: bool = False, extra: bytes = b""
) -> list[bytes]:
    top = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n").encode() + extra + b"\r\n"  # fmt: skip
    return [top] if head else [top, body]


class MetricsEndpoint:
    """Answers one scraper's request head. `prepare` brings the table up to date before
    a scrape; `healthy` says whether any hook is attached; `dropped` counts refusals."""

    def __init__(
        self,
        registry: CollectorRegistry,
        web: webconfig.WebConfig | None,
        prepare: Callable[[], None],
        healthy: Callable[[], bool],
        dropped: Counter[str],
    ) -> None:
        self.registry = registry
        self.web = web
        self.prepare = prepare
        self.healthy = healthy
        self.dropped = dropped

    def __call__(self, head: bytes) -> list[bytes]:
        web = self.web
        extra = web.headers if web is not None else b""  # the web config's headers, on every answer
        try:
            method, target, _version = head.split(b"\n", 1)[0].removesuffix(b"\r").decode("ascii").split(" ")
        except (ValueError, UnicodeDecodeError):
            return answer(400, b"bad request\n", extra=extra)
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return answer(405, b"only GET\n", extra=extra)
        got = self._route(path, head, extra)
        return got[:1] if method == "HEAD" else got  # HEAD: the same head, no body (RFC 9110 9.3.2)

    def _route(self, path: str, head: bytes, extra: bytes) -> list[bytes]:
        web = self.web
        if path == "/metrics" and web is not None and not web.allows(webconfig.header(head, b"Authorization")):
            self.dropped["unauthorized"] += 1
            return answer(401, b"unauthorized\n", extra=extra + b'WWW-Authenticate: Basic realm="sockwatch"\r\n')
        try:
            if path == "/metrics":
                self.prepare()
                # OpenMetrics when the scraper asks for it (Accept), as exporters negotiate
                encode, ctype = choose_encoder(webconfig.header(head, b"Accept") or "")
                body = encode(self.registry)
                if len(body) >= GZIP_FROM and "gzip" in (webconfig.header(head, b"Accept-Encoding") or "").lower():
                    body = gzip.compress(body, 6)
                    extra += b"Content-Encoding: gzip\r\n"
                return answer(200, body, ctype, extra=extra + b"Vary: Accept, Accept-Encoding\r\n")
            if path in ("/healthz", "/readyz"):
                ok = self.healthy()
                return answer(200 if ok else 503, b"ok\n" if ok else b"no hook attached\n", extra=extra)
        except Exception:
            log.exception("answering %s failed", path)
            self.dropped["internal_error"] += 1
            return answer(500, b"internal error in the agent (logged)\n", extra=extra)
        return answer(404, b"try /metrics or /healthz\n", extra=extra)
