"""The metrics as Prometheus sees them: a real Prometheus server (Debian's package) on
loopback scrapes `sockwatch serve` every second; the test opens sockets and fails a bind
in a namespace of its own and reads the values back through Prometheus's HTTP API.
promtool checks the exposition."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import bcrypt
import pytest

from tests.kernel.conftest import CHILD_COMM, AgentProc
from tests.unit.test_serve_config import cert

EADDRINUSE = 98


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.fixture
def metrics_agent(tmp_path) -> Iterator[tuple[AgentProc, str]]:
    a = AgentProc(socket=str(tmp_path / "a.sock"))
    try:
        url = a.status()["metrics"]
        assert url and url.startswith("http://127.0.0.1:"), url  # loopback unless told otherwise
        yield a, url
    finally:
        a.stop()


@contextlib.contextmanager
def running_prometheus(tmp_path, target: str, job_extra: str = "") -> Iterator[str]:
    """A real Prometheus on loopback scraping `target` every second; its base URL."""
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: sockwatch\n{job_extra}    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(base + "/-/ready")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise AssertionError(f"prometheus did not start: {err}") from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def prometheus(tmp_path, metrics_agent) -> Iterator[str]:
    with running_prometheus(tmp_path, urllib.parse.urlparse(metrics_agent[1]).netloc) as base:
        yield base


def query(base: str, expr: str) -> list[dict]:
    answer = json.loads(get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def until(base: str, expr: str, ok, timeout: float = 20) -> list[dict]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = query(base, expr)
        if ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr}: {got}")
        time.sleep(0.5)


def test_prometheus_reads_who_owns_each_port(metrics_agent, prometheus, netns, child_factory):
    c, other = child_factory(netns.name), child_factory(netns.name)
    c.do(op="tcp_listen", addr="0.0.0.0", port=47300)
    c.do(op="udp_bind", addr="127.0.0.1", port=47301)
    for _ in range(3):
        c.do(op="tcp_connect", addr="127.0.0.1", port=47300, accept_on=1)
    assert other.attempt(op="tcp_bind", addr="127.0.0.1", port=47300).get("errno") == EADDRINUSE
    ns = str(netns.inode)
    got = until(prometheus, f'sockwatch_listener_info{{netns="{ns}",port="47300"}}', lambda r: len(r) == 1)
    labels = got[0]["metric"]
    assert (labels["protocol"], labels["address"], labels["comm"], labels["port_class"]) == (
        "tcp", "0.0.0.0", CHILD_COMM, "ephemeral")  # fmt: skip
    until(prometheus, f'sockwatch_listener_info{{netns="{ns}",port="47301",protocol="udp"}}', lambda r: len(r) == 1)
    until(prometheus, f'sockwatch_listener_connections{{netns="{ns}",port="47300"}}',
          lambda r: len(r) == 1 and r[0]["value"][1] == "3")  # fmt: skip
    until(prometheus, f'sockwatch_sockets{{netns="{ns}",protocol="tcp",state="ESTAB"}}',
          lambda r: len(r) == 1 and r[0]["value"][1] == "6")  # fmt: skip
    until(prometheus, 'sockwatch_bind_failures_total{port="47300",errno="EADDRINUSE",protocol="tcp"}',
          lambda r: len(r) == 1 and r[0]["value"][1] == "1")  # fmt: skip
    until(prometheus, 'up{job="sockwatch"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
    until(prometheus, "sockwatch_programs_attached", lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 7)


def test_the_exposition_passes_promtool_and_health_answers(metrics_agent, netns, child_factory):
    _agent, url = metrics_agent
    c = child_factory(netns.name)
    c.do(op="tcp_listen", addr="127.0.0.1", port=47302)
    body = get(url)
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"sockwatch_build_info" in body and b'port="47302"' in body
    base = url.removesuffix("/metrics")
    assert get(base + "/healthz") == b"ok\n"
    for path, code in (("/nope", 404), ("/metrics?x=1", 200)):
        try:
            with urllib.request.urlopen(base + path, timeout=10) as resp:
                assert resp.status == code
        except urllib.error.HTTPError as e:
            assert e.code == code, path
    # garbage on the metrics port is answered, not fatal
    host, port = urllib.parse.urlparse(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00\xff garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    # bare LF line ends (RFC 9112 lets a server take them) are answered at once, not after the deadline
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"GET /healthz HTTP/1.1\nHost: x\n\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200"), "no answer to a request with bare LFs"
    # pipelined requests on a kept-alive connection: each answered in turn, and the
    # connection ends after the one that asks to close it, at once
    with socket.create_connection((host, int(port)), timeout=2) as s:
        ask = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        s.sendall(ask + b"\r\n" + ask + b"\r\n" + ask + b"Connection: close\r\n\r\n")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert got.count(b"HTTP/1.1 200") == 3 and got.count(b"Connection: keep-alive\r\n") == 2, got
        assert got.count(b"Connection: close\r\n") == 1 and got.endswith(b"ok\n"), got
    assert get(base + "/healthz") == b"ok\n"


def test_tls_and_basic_auth_from_a_web_config_with_a_real_prometheus(tmp_path):
    """The exporters' web config: TLS, and a bcrypt user. Prometheus scrapes with the CA
    and the password; without them the agent answers 401 or no HTTP at all."""
    c, k = cert(tmp_path)
    hashed = bcrypt.hashpw(b"scrape-me", bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {c}\n  key_file: {k}\nbasic_auth_users:\n  prom: '{hashed}'\n"
                   "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")  # fmt: skip
    a = AgentProc(socket=str(tmp_path / "a.sock"), extra=("--web-config", str(web)))
    try:
        url = a.status()["metrics"]
        assert url.startswith("https://127.0.0.1:"), url
        ctx = ssl.create_default_context(cafile=str(tmp_path / c))
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10, context=ctx)
        assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == 'Basic realm="sockwatch"'
        assert e.value.headers["X-Content-Type-Options"] == "nosniff"  # the web config's headers, on every answer
        req = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"prom:scrape-me")
                                                   .decode()})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            assert b"sockwatch_build_info" in r.read() and r.headers["X-Content-Type-Options"] == "nosniff"
        with urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=10, context=ctx) as r:
            assert r.read() == b"ok\n"  # probes need no password
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            get(url.replace("https://", "http://"))  # plain HTTP is not answered
        job = (f"    scheme: https\n    tls_config:\n      ca_file: {tmp_path / c}\n"
               "    basic_auth:\n      username: prom\n      password: scrape-me\n")  # fmt: skip
        with running_prometheus(tmp_path, urllib.parse.urlparse(url).netloc, job) as base:
            until(base, 'up{job="sockwatch"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
            until(base, "sockwatch_programs_attached", lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 7)
        assert a.status()["clients_dropped"].get("unauthorized", 0) >= 1
    finally:
        a.stop()


def signed(tmp_path, name: str) -> None:
    """A server certificate for 127.0.0.1, `name`.crt/.key, signed by ca.crt (made once)."""
    ca_key, ca = tmp_path / "ca.key", tmp_path / "ca.crt"
    if not ca.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "2", "-subj", "/CN=sockwatch test CA", "-keyout", str(ca_key), "-out", str(ca)],
                       check=True, capture_output=True)  # fmt: skip
    key, csr, crt = (tmp_path / f"{name}.{x}" for x in ("key", "csr", "crt"))
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        check=True,
        capture_output=True,
    )
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt)],
                   check=True, capture_output=True)  # fmt: skip


def served_certificate(url: str, cafile: str) -> bytes:
    host, port = urllib.parse.urlparse(url).netloc.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def scraper_ports(port: int) -> set[int]:
    """Local ports of the established connections to the metrics port (Prometheus's)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", "dport", "=", f":{port}"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines()}


def test_exporter_conventions_keep_alive_telemetry_path_and_a_web_config_read_again(tmp_path):
    """With a real Prometheus over TLS: the metrics at --web.telemetry-path, one kept-alive
    connection for scrape after scrape, and the web config read again while the agent
    runs: a rotated certificate is served to the next connection, and a user taken out
    of the file is refused at the next scrape, with no restart and no SIGHUP."""
    signed(tmp_path, "a")
    one, two = (bcrypt.hashpw(p, bcrypt.gensalt(4)).decode() for p in (b"one", b"two"))
    web = tmp_path / "web.yml"

    def config(cert: str, users: str) -> None:
        web.write_text(f"tls_server_config:\n  cert_file: {cert}.crt\n  key_file: {cert}.key\n"
                       f"basic_auth_users:\n{users}")  # fmt: skip

    config("a", f"  prom: '{one}'\n  other: '{two}'\n")
    a = AgentProc(socket=str(tmp_path / "a.sock"),
                  extra=("--web.config.file", str(web), "--web.telemetry-path", "/sw/metrics"))  # fmt: skip
    try:
        url = a.status()["metrics"]
        assert url.startswith("https://127.0.0.1:") and url.endswith("/sw/metrics"), url
        port = int(urllib.parse.urlparse(url).port or 0)
        ca = str(tmp_path / "ca.crt")
        first = served_certificate(url, ca)
        job = (f"    scheme: https\n    metrics_path: /sw/metrics\n    tls_config:\n      ca_file: {ca}\n"
               "    basic_auth:\n      username: prom\n      password: one\n")  # fmt: skip
        with running_prometheus(tmp_path, urllib.parse.urlparse(url).netloc, job) as base:
            until(base, 'up{job="sockwatch"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
            ports = scraper_ports(port)
            until(base, "count_over_time(up[30s])", lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 5)
            assert len(ports) == 1 and scraper_ports(port) == ports  # five scrapes later: the same connection
            # a rotated certificate (same names, new files), then a user taken out: read again, no restart
            signed(tmp_path, "b")
            config("b", f"  prom: '{one}'\n  other: '{two}'\n")
            deadline = time.monotonic() + 10
            while served_certificate(url, ca) == first:
                assert time.monotonic() < deadline, "the rotated certificate was not served"
                time.sleep(0.3)
            config("b", f"  other: '{two}'\n")
            until(base, 'up{job="sockwatch"}', lambda r: len(r) == 1 and r[0]["value"][1] == "0")
        st = a.status()
        assert st["clients_dropped"].get("unauthorized", 0) >= 1
        assert st.get("web_config_reloads", {}).get("ok", 0) >= 2, st.get("web_config_reloads")
    finally:
        a.stop()
