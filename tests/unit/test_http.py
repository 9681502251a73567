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


def status_and_body(answer: tuple[list[bytes], bool]) -> tuple[int, bytes, dict[str, str]]:
    raw = b"".join(answer[0])
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
    (top, body), _keep = ep(head)
    text = top.decode()
    assert f"Content-Type: {ctype}" in text
    assert ("Content-Encoding: gzip" in text) == (encoding == "gzip, deflate")
    if "Content-Encoding: gzip" in text:
        body = gzip.decompress(body)
    assert int(re.search(r"Content-Length: (\d+)", text).group(1)) > 0
    assert b'sw_test_series{n="199"} 199.0' in body
    assert body.endswith(b"# EOF\n") == ctype.startswith("application/openmetrics")


@pytest.mark.parametrize("head, keep", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", True),  # HTTP/1.1: persistent by default
    (b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    (b"GET /metrics HTTP/1.1\r\nConnection: Keep-Alive, Close\r\n\r\n", False),
    (b"GET /metrics HTTP/1.0\r\n\r\n", False),  # HTTP/1.0: only when asked
    (b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n", False),  # a body is not read: no next request
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", True),
    (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    (b"GET /nope HTTP/1.1\r\n\r\n", True),  # a 404 is an answer like another
    (b"POST /metrics HTTP/1.1\r\n\r\n", False),
    (b"\x00\xff\r\n\r\n", False),
])  # fmt: skip
def test_which_connections_stay_open(head, keep):
    e = endpoint()
    chunks, kept = e(head)
    assert kept is keep
    assert f"Connection: {'keep-alive' if keep else 'close'}\r\n".encode() in chunks[0]


def test_an_unhealthy_answer_closes_and_the_telemetry_path_moves():
    assert endpoint(healthy=False)(b"GET /healthz HTTP/1.1\r\n\r\n")[1] is False
    reg = CollectorRegistry()
    Gauge("sockwatch_test", "a sample", registry=reg).set(1)
    e = http.MetricsEndpoint(reg, None, prepare=lambda: None, healthy=lambda: True, dropped=Counter(),
                             path="/x/metrics")  # fmt: skip
    assert status_and_body(e(b"GET /x/metrics HTTP/1.1\r\n\r\n"))[0] == 200
    code, body, _ = status_and_body(e(b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert code == 404 and b"/x/metrics" in body


def test_the_rate_limit_is_a_token_bucket():
    b = http.Bucket(0.5, 2)
    t = b.at
    assert [b.take(t), b.take(t), b.take(t)] == [True, True, False]  # the burst, then none
    assert b.take(t + 0.4) is False and b.take(t + 0.6) is True  # one more every 0.5 s
    assert [b.take(t + 10), b.take(t + 10), b.take(t + 10)] == [True, True, False]  # never above the burst
