"""`serve`'s settings from a TOML file and SOCKWATCH_* variables, and the exporters' web
config (TLS, basic auth): what is accepted, what wins, and the one sentence for the rest."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import time

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockwatch.agent import webconfig
from sockwatch.cli import config
from tests.unit.test_cli import run

SCALARS = {"listen", "max-udp", "socket"}
LISTS = {"metrics-drop-label"}


def write(tmp_path, text: str, mode: int = 0o600, name: str = "sw.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


def test_a_config_file_gives_the_flags_strings(tmp_path):
    got = config.load(write(tmp_path, 'listen = "0.0.0.0:9847"\nmax-udp = 4096\nmetrics-drop-label = ["comm"]\n'),
                      SCALARS, LISTS)  # fmt: skip
    assert got == {"listen": "0.0.0.0:9847", "max-udp": "4096", "metrics-drop-label": ["comm"]}


@pytest.mark.parametrize(
    ("text", "mode", "needle"),
    [
        ("listen = [1]\n", 0o600, "listen takes a string or a number"),
        ("max-udp = true\n", 0o600, "takes a string or a number, not bool"),
        ("lisen = 'x'\n", 0o600, "unknown setting 'lisen' (known: listen, max-udp, metrics-drop-label, socket)"),
        ("metrics-drop-label = [1]\n", 0o600, "takes a string or a list of strings"),
        ("listen = \n", 0o600, "is not TOML"),
        ("listen = 'x'\n", 0o666, "can be written by others than root"),
        ("x" * (config.MAX_BYTES + 10), 0o600, "is over 64 KiB"),
    ],
)
def test_a_bad_config_file_is_one_sentence(tmp_path, text, mode, needle):
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, text, mode), SCALARS, LISTS)
    assert needle in str(e.value)


LOADERS = {
    "--config": (lambda path: config.load(path, SCALARS, LISTS), config.ConfigError),
    "--web-config": (webconfig.load, webconfig.WebConfigError),
}


@pytest.mark.parametrize("flag", list(LOADERS))
@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (str, "not a regular file"),
        (lambda d: (os.mkfifo(d / "fifo"), str(d / "fifo"))[1], "not a regular file"),  # no read that hangs
        (lambda d: (os.symlink("/etc/passwd", d / "link"), str(d / "link"))[1], "is a symlink"),  # not followed
        (lambda d: write(d, "{}\n", 0o646, "f"), "can be written by others than root"),
        (lambda d: write(d, "{}\n", 0o660, "f"), "can be written by others than root"),
        (
            lambda d: (os.chown(write(d, "{}\n", 0o600, "f"), 65534, 65534), str(d / "f"))[1],
            "can be written by others than root",
        ),
    ],
    ids=["directory", "fifo", "symlink", "world-writable", "group-writable", "owned-by-nobody"],
)
def test_a_config_file_is_roots_own_regular_file(tmp_path, flag, make, needle):
    """--config and --web-config are trusted alike: what root is told to read."""
    load, error = LOADERS[flag]
    path = make(tmp_path)
    with pytest.raises(error, match=needle):
        load(path)


def test_serve_takes_flags_over_environment_over_the_file(tmp_path):
    """The bad value shows which source won: each layer sets --max-udp to a value that
    names itself in the error."""
    f = write(tmp_path, "max-udp = 11\nringbuf-pages = 12\n")
    r = run("serve", "--config", f)
    assert r.returncode == 2 and "--max-udp '11'" in r.stderr, r.stderr
    env = {**os.environ, "SOCKWATCH_MAX_UDP": "22"}
    from tests.conftest import sockwatch_cmd

    r = subprocess.run(sockwatch_cmd("serve", "--config", f), env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "--max-udp '22'" in r.stderr, r.stderr
    r = subprocess.run(sockwatch_cmd("serve", "--config", f, "--max-udp", "33"), env=env, capture_output=True,
                       text=True, check=False)  # fmt: skip
    assert r.returncode == 2 and "--max-udp '33'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--metrics-drop-label", "cookie"], "--metrics-drop-label 'cookie' is not one of"),
        (["--metrics-max-listeners", "-1"], "is not a whole number (0 to 100000)"),
        (["--kubelet-log-dir", "var/log"], "is not an absolute path"),
        (["--kubelet-log-dir", "/etc/passwd"], "--kubelet-log-dir '/etc/passwd' is not a directory"),
        (["--web-config", "/nonexistent/web.yml"], "cannot read the web config"),
        (["--config", "/nonexistent/sw.toml"], "cannot read the config file"),
    ],
)
def test_serve_refuses_bad_settings_before_starting(args, needle):
    r = run("serve", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- the web config --------------------------------------------------------------------------


def cert(tmp_path) -> tuple[str, str]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
                   check=True, capture_output=True)  # fmt: skip
    return "c.pem", "k.pem"


def test_web_config_tls_and_users(tmp_path):
    c, k = cert(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    w = webconfig.load(write(tmp_path, f"tls_server_config:\n  cert_file: {c}\n  key_file: {k}\n  min_version: TLS13\n"
                                       f"basic_auth_users:\n  prom: '{hashed}'\n", name="web.yml"))  # fmt: skip
    assert w.tls is not None and w.tls.minimum_version == ssl.TLSVersion.TLSv1_3
    good = "Basic " + base64.b64encode(b"prom:s3cret").decode()
    assert w.allows(good) and w.allows(good)  # the second from the cache
    assert not w.allows("Basic " + base64.b64encode(b"prom:wrong").decode())
    assert not w.allows("Basic " + base64.b64encode(b"eve:s3cret").decode())
    assert not w.allows(None) and not w.allows("Bearer x") and not w.allows("Basic %%%")
    assert webconfig.WebConfig().allows(None)  # no users: no auth


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tls_server_config:\n  cert_file: c.pem\n", "needs cert_file and key_file"),
        ("tls_server_config:\n  cert_file: nope.pem\n  key_file: nope.pem\n", "cannot load"),
        ("tls_server_config:\n  cert: c.pem\n", "needs cert_file and key_file (or cert and key)"),
        ("tls_server_config:\n  certfile: c.pem\n", "tls_server_config takes"),
        ("tls_server_config:\n  cert: x\n  cert_file: c.pem\n  key_file: k.pem\n", "cert or cert_file, not both"),
        ("tls_server_config:\n  cipher_suites: TLS_AES_128_GCM_SHA256\n", "cipher_suites is a list of strings"),
        ("tls_server_config:\n  prefer_server_cipher_suites: yes please\n", "is true or false"),
        ("rate_limit:\n  interval: fast\n  burst: 1\n", "interval is a duration"),
        ("rate_limit:\n  interval: 1s\n  burst: -1\n", "burst is a whole number"),
        ("rate_limit:\n  interval: 1s\n", "needs a burst of 1 or more"),
        ("rate_limit:\n  every: 1s\n", "rate_limit takes interval and burst"),
        ("basic_auth_users:\n  prom: plaintext\n", "is not a bcrypt hash"),
        ("basic_auth_users: [a]\n", "maps user names to bcrypt hashes"),
        ("tls_config: {}\n", "unknown section 'tls_config'"),
        ("http_server_config:\n  http3: true\n", "http_server_config takes http2 and headers"),
        ("http_server_config:\n  http2: maybe\n", "http2 is true or false"),
        ("http_server_config:\n  headers: [a]\n", "headers map header names to values"),
        ("http_server_config:\n  headers:\n    Set-Cookie: a=b\n", "header 'Set-Cookie' cannot be set"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: allow-from\n", "X-Frame-Options is one of deny"),
        ('http_server_config:\n  headers:\n    X-XSS-Protection: "1\\r\\nSet-Cookie: a=b"\n', "one line of printable"),
        ("[unclosed\n", "is not YAML"),
        ("- a\n", "is not a mapping"),
    ],
)
def test_a_bad_web_config_is_one_sentence(tmp_path, text, needle):
    with pytest.raises(webconfig.WebConfigError) as e:
        webconfig.load(write(tmp_path, text, name="web.yml"))
    assert needle in str(e.value)


def test_web_config_headers_are_sent_as_lines(tmp_path):
    w = webconfig.load(write(tmp_path, "http_server_config:\n  http2: true\n  headers:\n"
                                       "    X-Content-Type-Options: nosniff\n    X-Frame-Options: DENY\n"
                                       "    Content-Security-Policy: ''\n", name="web.yml"))  # fmt: skip
    assert w.headers == b"X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"  # blank: not sent
    assert webconfig.load(write(tmp_path, "basic_auth_users: {}\n", name="web2.yml")).headers == b""


def test_tls_client_auth_needs_a_ca(tmp_path):
    c, k = cert(tmp_path)
    text = f"tls_server_config:\n  cert_file: {c}\n  key_file: {k}\n  client_auth_type: RequireAndVerifyClientCert\n"
    with pytest.raises(webconfig.WebConfigError, match="needs client_ca_file"):
        webconfig.load(write(tmp_path, text, name="web.yml"))
    w = webconfig.load(write(tmp_path, text + f"  client_ca_file: {c}\n", name="web.yml"))
    assert w.tls is not None and w.tls.verify_mode == ssl.CERT_REQUIRED


def test_header_lookup_is_case_insensitive():
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nauthorization: Basic abc\r\n"
    assert webconfig.header(head, b"Authorization") == "Basic abc"
    assert webconfig.header(b"GET / HTTP/1.1\r\nAuthorization-X: 1", b"Authorization") is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_any_file_is_settings_or_one_sentence(tmp_path, text):
    """Whatever the files hold, loading gives settings or the module's own error."""
    for loader, err in ((lambda p: config.load(p, SCALARS, LISTS), config.ConfigError),
                        (webconfig.load, webconfig.WebConfigError)):  # fmt: skip
        path = write(tmp_path, text, name="fuzz")
        try:
            loader(path)
        except err as e:
            assert "\n" not in str(e).strip() or "YAML" in str(e) or "TOML" in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(["tls_server_config", "basic_auth_users", "rate_limit", "http_server_config", "x"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
            max_leaves=8,
        ),
    )
)
def test_any_yaml_shape_is_a_web_config_or_one_sentence(tmp_path, doc):
    import yaml

    try:
        webconfig.load(write(tmp_path, yaml.safe_dump(doc), name="web.yml"))
    except webconfig.WebConfigError:
        pass


def test_keep_and_drop_label_lists_are_strict():
    r = run("serve", "--metrics-keep-label", "netns", "--metrics-keep-label", "pid")
    assert r.returncode == 2 and "--metrics-keep-label 'pid' is not one of" in r.stderr, r.stderr


@pytest.mark.parametrize(("text", "want"), [
    (":9847", ("", 9847)),  # every address, IPv4 and IPv6, as node_exporter's --web.listen-address
    (":0", ("", 0)),
    ("0.0.0.0:9847", ("0.0.0.0", 9847)),
    ("[::1]:9847", ("::1", 9847)),
    ("off", None),
])  # fmt: skip
def test_listen_addresses_as_exporters_write_them(text, want):
    from sockwatch.cli import args

    assert args.listen_address(text, "--listen") == want


@pytest.mark.parametrize("text", [":", ":port", ":70000", "::1:80"])
def test_listen_addresses_refused(text):
    from sockwatch.cli import args

    with pytest.raises(args.ArgError):
        args.listen_address(text, "--listen")


def tls_text(c: str, k: str, more: str = "") -> str:
    return f"tls_server_config:\n  cert_file: {c}\n  key_file: {k}\n{more}"


@pytest.mark.parametrize(("more", "needle"), [
    ("  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "is not one of Go's secure suites"),
    ("  curve_preferences: [CurveP256, X25519]\n", "takes one curve"),
    ("  curve_preferences: [P-256]\n", "takes one curve"),
    ("  client_auth_type: RequireAnyClientCert\n", "needs client_ca_file (or client_ca)"),
    ("  client_allowed_sans: [a]\n", "client_allowed_sans needs client_auth_type"),
    ("  client_auth_type: Sometimes\n", "client_auth_type is one of"),
])  # fmt: skip
def test_the_rest_of_exporter_toolkits_tls_schema_is_checked(tmp_path, more, needle):
    c, k = cert(tmp_path)
    with pytest.raises(webconfig.WebConfigError) as e:
        webconfig.load(write(tmp_path, tls_text(c, k, more), name="web.yml"))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_exporter_toolkits_whole_schema_loads(tmp_path):
    """Every key exporter-toolkit documents: ciphers by Go's names, server preference,
    a curve, inline PEM for the certificate, key and client CA, RequireAnyClientCert
    with allowed SANs, and a rate limit."""
    c, k = cert(tmp_path)
    pem = {n: (tmp_path / f).read_text() for n, f in (("cert", c), ("key", k))}
    indent = "\n".join

    def block(text: str) -> str:
        return "|\n" + indent("    " + line for line in text.strip().splitlines())

    text = (f"tls_server_config:\n  cert: {block(pem['cert'])}\n  key: {block(pem['key'])}\n"
            f"  client_ca: {block(pem['cert'])}\n  client_auth_type: RequireAnyClientCert\n"
            "  client_allowed_sans: [127.0.0.1, scraper.example]\n"
            "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
            "  prefer_server_cipher_suites: false\n  curve_preferences: [CurveP256]\n"
            "  min_version: TLS12\n  max_version: TLS13\n"
            "http_server_config:\n  http2: false\n"
            "rate_limit:\n  interval: 1m30s\n  burst: 5\n")  # fmt: skip
    w = webconfig.load(write(tmp_path, text, name="web.yml"))
    assert w.tls is not None and w.tls.verify_mode == ssl.CERT_REQUIRED
    assert not w.tls.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = {x["name"] for x in w.tls.get_ciphers() if x["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256"}
    assert w.rate == (90.0, 5) and w.allowed_sans == {"127.0.0.1", "scraper.example"}
    assert w.files == (str(tmp_path / "web.yml"),)  # inline PEM: only the file itself to watch
    assert w.client_allowed({"subjectAltName": (("IP Address", "127.0.0.1"),)})
    assert not w.client_allowed({"subjectAltName": (("DNS", "evil.example"),)}) and not w.client_allowed(None)
    assert not os.listdir("/proc/self/fd") or all(
        not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sockwatch") for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}"))  # fmt: skip
    assert webconfig.load(write(tmp_path, "rate_limit:\n  interval: 0\n  burst: 0\n", name="w2.yml")).rate == (0.0, 0)


def test_the_web_config_is_read_again_when_its_files_change(tmp_path):
    c, k = cert(tmp_path)
    path = write(tmp_path, tls_text(c, k), name="web.yml")
    watched = webconfig.Watched(path, webconfig.load(path))
    first = watched.cfg
    assert watched.current(time.monotonic() + 5) is first  # nothing changed: the same
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    write(tmp_path, tls_text(c, k, f"basic_auth_users:\n  prom: '{hashed}'\n"), name="web.yml")
    now = time.monotonic() + 10
    assert watched.current(now) is not first and watched.cfg.users and watched.reloads["ok"] == 1
    assert watched.current(now + 0.5) is watched.cfg  # at most once a second
    # a rotated certificate (the config file unchanged) is a change too
    cert(tmp_path)
    kept = watched.cfg
    now += 5
    assert watched.current(now) is not kept and watched.reloads["ok"] == 2
    # a file that no longer loads, or that would turn TLS off: the one in use stays
    for text in ("tls_server_config:\n  cert_file: gone.pem\n  key_file: gone.pem\n", "basic_auth_users: {}\n"):
        kept = watched.cfg
        write(tmp_path, text, name="web.yml")
        now += 5
        assert watched.current(now) is kept
    assert watched.reloads["failed"] == 2
    assert watched.reload("SIGHUP") is False and watched.cfg is kept


@pytest.mark.parametrize("argv, want", [
    (["--web.listen-address", ":9847"], ["--listen", ":9847"]),
    (["--web.listen-address=:9847", "--log.level=debug"], ["--listen=:9847", "--log-level=debug"]),
    (["--web.config.file", "w.yml", "--web.telemetry-path", "/m", "--log.format", "json"],
     ["--web-config", "w.yml", "--telemetry-path", "/m", "--log-format", "json"]),
    (["--socket", "--web.listen-address"], ["--socket", "--listen"]),  # (click then says what is missing)
    (["--", "--log.level"], ["--", "--log.level"]),
])  # fmt: skip
def test_the_exporters_spellings_are_sockwatchs_flags(argv, want):
    from sockwatch.cli import serve

    assert serve.exporter_spellings(argv) == want
