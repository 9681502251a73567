"""The metrics port's answers to request heads (pure: a registry, no socket)."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, Gauge

from sockwatch.agent import http


def endpoint(healthy: bool = True) -> http.MetricsEndpoint:
    reg = CollectorRegistry()
    Gauge("sockwatch_test", "a sample", registry=reg).set(1)
    return http.MetricsEndpoint(reg, None, prepare=lambda: None, healthy=lambda: healthy, dropped=Counter())


def status_and_body(chunks: list[bytes]) -> tuple[int, bytes, dict[str, str]]:
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), body, headers


@pytest.mark.parametrize(
    ("path", "healthy", "code"),
    [
        ("/metrics", True, 200),
        ("/healthz", True, 200),
        ("/healthz", False, 503),
        ("/readyz", True, 200),
        ("/nope", True, 404),
    ],
)
def test_head_gets_the_get_head_and_no_body(path, healthy, code):
    e = endpoint(healthy)
    got_code, body, headers = status_and_body(e(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    h_code, h_body, h_headers = status_and_body(e(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    assert got_code == h_code == code
    assert body and h_body == b""
    assert h_headers["Content-Length"] == headers["Content-Length"] == str(len(body))


def test_other_methods_and_garbage_are_answered_in_one_line():
    e = endpoint()
    assert status_and_body(e(b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
    assert status_and_body(e(b"\x00\xff\r\n\r\n"))[0] == 400


@pytest.mark.parametrize(("accept", "encoding", "ctype"), [
    ("", "", "text/plain; version=0.0.4; charset=utf-8"),
    ("application/openmetrics-text; version=1.0.0,text/plain;q=0.5", "", "application/openmetrics-text"),
    ("text/plain", "gzip, deflate", "text/plain; version=0.0.4; charset=utf-8"),
])  # fmt: skip
def test_metrics_are_negotiated_as_exporters_do(accept, encoding, ctype):
    """OpenMetrics when Accept asks for it, gzip when Accept-Encoding allows it (for a
    body worth compressing), the plain text format otherwise."""
    import gzip
    import re

    from prometheus_client import Gauge

    reg = CollectorRegistry()
    g = Gauge("sw_test_series", "a series", ["n"], registry=reg)
    for i in range(200):
        g.labels(str(i)).set(i)
    ep = http.MetricsEndpoint(reg, None, prepare=lambda: None, healthy=lambda: True, dropped=Counter())
    head = f"GET /metrics HTTP/1.1\r\nAccept: {accept}\r\nAccept-Encoding: {encoding}\r\n\r\n".encode()
    if not encoding and not accept.startswith("application/openmetrics"):
        head = b"GET /metrics HTTP/1.1\r\n\r\n"
    top, body = ep(head)
    text = top.decode()
    assert f"Content-Type: {ctype}" in text
    assert ("Content-Encoding: gzip" in text) == (encoding == "gzip, deflate")
    if "Content-Encoding: gzip" in text:
        body = gzip.decompress(body)
    assert int(re.search(r"Content-Length: (\d+)", text).group(1)) > 0
    assert b'sw_test_series{n="199"} 199.0' in body
    assert body.endswith(b"# EOF\n") == ctype.startswith("application/openmetrics")
