"""`serve --web-config FILE`: TLS and basic auth for /metrics, in the file format the
Prometheus exporters share (prometheus/exporter-toolkit's web configuration):

    tls_server_config:
      cert_file: server.crt          # relative paths are from the file's directory
      key_file: server.key           # (or cert: / key: the PEM itself)
      client_auth_type: RequireAndVerifyClientCert   # optional; needs client_ca_file
      client_ca_file: ca.crt         # (or client_ca: the PEM itself)
      client_allowed_sans: [scraper.example]         # optional: a client certificate's SAN
      min_version: TLS12             # optional, as max_version
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]  # optional: Go's names, TLS <= 1.2
      prefer_server_cipher_suites: true
      curve_preferences: [X25519]    # optional: one curve (Python's TLS sets one)
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')
    http_server_config:
      headers:                       # added to every answer; blank: not sent
        X-Content-Type-Options: nosniff
        Strict-Transport-Security: max-age=31536000
      http2: false                   # read, but answers are HTTP/1.1 either way
    rate_limit:
      interval: 100ms                # one request per interval, after a burst; 0: no limit
      burst: 10

Everything is checked at start (the certificate and key load, the hashes are bcrypt),
so a bad file stops `serve` with one sentence rather than failing each scrape. Then, as
exporter-toolkit reads its file on every request, the file and every file it names are
looked at again (at most once a second, when a scraper connects): a rotated certificate
or a new user takes effect without a restart, and a file that no longer loads leaves
the one in use (said in the log, counted). TLS on or off is the start's. /healthz
answers without auth (it says only "ok"): probes need not hold a password.

Python's TLS verifies every certificate a client sends: RequestClientCert and
RequireAnyClientCert take a client CA and verify against it (Go's accept any
certificate), stricter, never looser.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field

from sockwatch import rootfile
from sockwatch.filters import shown

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024
_BCRYPT = re.compile(rb"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's names (crypto/tls CipherSuites(): the secure ones, as exporter-toolkit takes) -> OpenSSL's
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",  # Go's older spellings
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    # TLS 1.3's: taken, and as in Go they do not narrow TLS 1.3
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit's headers and what each accepts (None: any value of one line)
_HEADERS: dict[str, set[str] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": {"deny", "sameorigin"},
    "X-Content-Type-Options": {"nosniff"},
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
_TLS_KEYS = {"cert_file", "key_file", "cert", "key", "client_auth_type", "client_ca_file", "client_ca",
             "client_allowed_sans", "min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites",
             "curve_preferences"}  # fmt: skip
_DURATION = re.compile(r"(?:([0-9]+)(ms|s|m|h))+|0")
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# a bcrypt of a random password: unknown users cost as much as known ones (no timing oracle)
_DUMMY = b"$2b$10$K.MS3hdyErc.VkEv.SY89OlTQlBDJTrkVf/oEAJh/Cgj31UqU/7sO"


class WebConfigError(ValueError):
    pass


@dataclass
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: bytes = b""  # header lines every answer carries (http_server_config.headers)
    allowed_sans: frozenset[str] = frozenset()  # a client certificate must name one (empty: any)
    rate: tuple[float, int] = (0.0, 0)  # rate_limit: seconds between requests, burst (0: no limit)
    files: tuple[str, ...] = ()  # the file and every file it names: a change to any is a reload
    _verified: dict[tuple[str, bytes], bool] = field(default_factory=dict)

    def client_allowed(self, cert: dict | None) -> bool:
        """Whether a verified client certificate (ssl's getpeercert()) names one of the
        allowed SANs (DNS, IP, e-mail or URI), as exporter-toolkit checks them."""
        if not self.allowed_sans:
            return True
        sans = (cert or {}).get("subjectAltName", ())
        return any(kind in ("DNS", "IP Address", "email", "URI") and value in self.allowed_sans
                   for kind, value in sans)  # fmt: skip

    def allows(self, authorization: str | None) -> bool:
        """Does an Authorization header's value pass? Always, without users. A verified
        password is remembered by its SHA-256 (bcrypt costs ~0.1 s a check, each scrape
        would pay it), as exporter-toolkit caches it."""
        if not self.users:
            return True
        if authorization is None or not authorization.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        hit = self._verified.get(key)
        if hit is not None:
            return hit
        import bcrypt

        stored = self.users.get(user)
        ok = bcrypt.checkpw(password.encode(), stored if stored is not None else _DUMMY) and stored is not None
        if len(self._verified) >= 256:
            self._verified.clear()
        self._verified[key] = ok
        return ok


def load(path: str) -> WebConfig:
    import yaml

    raw = rootfile.read(path, "web config", MAX_BYTES, WebConfigError)  # as --config: root's own file
    try:
        doc = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise WebConfigError(f"the web config {shown(path)} is not YAML: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise WebConfigError(f"the web config {shown(path)} is not a mapping")
    unknown = set(doc) - {"tls_server_config", "basic_auth_users", "http_server_config", "rate_limit"}
    if unknown:
        first = shown(str(sorted(map(str, unknown))[0]))
        known = "tls_server_config, basic_auth_users, http_server_config, rate_limit"
        raise WebConfigError(f"{shown(path)}: unknown section {first} (known: {known})")
    base = os.path.dirname(os.path.abspath(path))
    cfg = WebConfig(files=(os.path.abspath(path),))
    if doc.get("tls_server_config") is not None:
        cfg.tls = _tls(doc["tls_server_config"], base, path, cfg)
    users = doc.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise WebConfigError(f"{shown(path)}: basic_auth_users maps user names to bcrypt hashes")
    for user, hashed in users.items():
        if not isinstance(user, str) or ":" in user or not isinstance(hashed, str):
            raise WebConfigError(f"{shown(path)}: basic_auth_users maps user names to bcrypt hashes")
        if not _BCRYPT.fullmatch(hashed.encode()):
            raise WebConfigError(f"{shown(path)}: the password of {shown(user)} is not a bcrypt hash "
                                 "(make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')")  # fmt: skip
        cfg.users[user] = hashed.encode()
    if doc.get("http_server_config") is not None:
        cfg.headers = _http(doc["http_server_config"], path)
    if doc.get("rate_limit") is not None:
        cfg.rate = _rate(doc["rate_limit"], path)
    return cfg


def _rate(section: object, path: str) -> tuple[float, int]:
    """rate_limit: interval (a Go duration: 100ms, 1s, 1m30s; 0 disables) and burst."""
    if not isinstance(section, dict) or not set(section) <= {"interval", "burst"}:
        raise WebConfigError(f"{shown(path)}: rate_limit takes interval and burst")
    interval, burst = section.get("interval", 0), section.get("burst", 0)
    text = str(interval).strip()
    if isinstance(interval, bool) or not _DURATION.fullmatch(text):
        raise WebConfigError(f"{shown(path)}: rate_limit's interval is a duration such as 100ms, 1s or 0")
    seconds = sum(int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))
    if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= 1_000_000:
        raise WebConfigError(f"{shown(path)}: rate_limit's burst is a whole number, 0 to 1000000")
    if seconds > 0 and burst < 1:
        raise WebConfigError(f"{shown(path)}: rate_limit with an interval needs a burst of 1 or more")
    return (seconds, burst) if seconds > 0 else (0.0, 0)


def _http(section: object, path: str) -> bytes:
    """http_server_config: its headers as lines to send. Values are checked as
    exporter-toolkit checks them, and must be one line of printable text (no header
    can be smuggled into an answer)."""
    if not isinstance(section, dict) or not set(section) <= {"http2", "headers"}:
        raise WebConfigError(f"{shown(path)}: http_server_config takes http2 and headers")
    if not isinstance(section.get("http2", False), bool):
        raise WebConfigError(f"{shown(path)}: http_server_config's http2 is true or false")
    headers = section.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{shown(path)}: http_server_config's headers map header names to values")
    out = b""
    for name, value in headers.items():
        if name not in _HEADERS:
            raise WebConfigError(f"{shown(path)}: header {shown(str(name))} cannot be set "
                                 f"(one of {', '.join(_HEADERS)})")  # fmt: skip
        if value is None or value == "":
            continue  # blank: not sent
        if not isinstance(value, str) or not value.isprintable() or not value.isascii():
            raise WebConfigError(f"{shown(path)}: the value of {name} is one line of printable ASCII")
        allowed = _HEADERS[name]
        if allowed is not None and value.lower() not in allowed:
            raise WebConfigError(f"{shown(path)}: {name} is one of {', '.join(sorted(allowed))}")
        out += f"{name}: {value}\r\n".encode()
    return out


def _tls(section: object, base: str, path: str, cfg: WebConfig) -> ssl.SSLContext:
    if not isinstance(section, dict) or set(section) - _TLS_KEYS:
        raise WebConfigError(f"{shown(path)}: tls_server_config takes {', '.join(sorted(_TLS_KEYS))}")
    lists = ("client_allowed_sans", "cipher_suites", "curve_preferences")
    for k, v in section.items():
        ok = (isinstance(v, list) and all(isinstance(x, str) for x in v) if k in lists
              else isinstance(v, bool) if k == "prefer_server_cipher_suites" else isinstance(v, str))  # fmt: skip
        if not ok:
            kind = "a list of strings" if k in lists else "true or false" if k.startswith("prefer") else "a string"
            raise WebConfigError(f"{shown(path)}: tls_server_config's {k} is {kind}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for key, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in section:
            if section[key] not in _VERSIONS:
                raise WebConfigError(f"{shown(path)}: {key} is one of {', '.join(_VERSIONS)}")
            setattr(ctx, attr, _VERSIONS[section[key]])
    _load_cert(ctx, section, base, path, cfg)
    auth = section.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{shown(path)}: client_auth_type is one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if ctx.verify_mode != ssl.CERT_NONE:
        if not section.get("client_ca_file") and not section.get("client_ca"):
            raise WebConfigError(f"{shown(path)}: client_auth_type {auth} needs client_ca_file (or client_ca): "
                                 "sockwatch verifies every client certificate")  # fmt: skip
        try:
            if section.get("client_ca"):
                ctx.load_verify_locations(cadata=section["client_ca"])
            else:
                ca = os.path.join(base, section["client_ca_file"])
                ctx.load_verify_locations(ca)
                cfg.files += (ca,)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise WebConfigError(f"{shown(path)}: cannot load the client CA: {e}") from None
    sans = section.get("client_allowed_sans") or []
    if sans and ctx.verify_mode != ssl.CERT_REQUIRED:
        raise WebConfigError(f"{shown(path)}: client_allowed_sans needs client_auth_type RequireAndVerifyClientCert "
                             "or RequireAnyClientCert (else a client may send no certificate)")  # fmt: skip
    cfg.allowed_sans = frozenset(sans)
    suites = section.get("cipher_suites") or []
    unknown = [c for c in suites if c not in _CIPHERS]
    if unknown:
        raise WebConfigError(f"{shown(path)}: cipher suite {shown(unknown[0])} is not one of Go's secure suites "
                             f"({', '.join(sorted(_CIPHERS))})")  # fmt: skip
    names = [_CIPHERS[c] for c in suites if _CIPHERS[c]]
    if names:
        ctx.set_ciphers(":".join(dict.fromkeys(names)))
    if section.get("prefer_server_cipher_suites", True):
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    curves = section.get("curve_preferences") or []
    if len(curves) > 1 or any(c not in _CURVES for c in curves):
        raise WebConfigError(f"{shown(path)}: curve_preferences takes one curve of {', '.join(_CURVES)} "
                             "(Python's TLS sets one)")  # fmt: skip
    if curves:
        ctx.set_ecdh_curve(_CURVES[curves[0]])
    return ctx


def _load_cert(ctx: ssl.SSLContext, section: dict, base: str, path: str, cfg: WebConfig) -> None:
    """The server's certificate and key: from files (cert_file, key_file), or inline PEM
    (cert, key), which ssl reads through a memfd: the key never touches a disk."""
    for inline, file in (("cert", "cert_file"), ("key", "key_file")):
        if section.get(inline) and section.get(file):
            raise WebConfigError(f"{shown(path)}: tls_server_config takes {inline} or {file}, not both")
        if not section.get(inline) and not section.get(file):
            raise WebConfigError(f"{shown(path)}: tls_server_config needs cert_file and key_file (or cert and key)")
    fds: list[int] = []
    try:
        where = []
        for inline, file in (("cert", "cert_file"), ("key", "key_file")):
            if section.get(inline):
                fd = os.memfd_create(f"sockwatch-{inline}", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, section[inline].encode())
                where.append(f"/proc/self/fd/{fd}")
            else:
                where.append(os.path.join(base, section[file]))
                cfg.files += (where[-1],)
        ctx.load_cert_chain(where[0], where[1])
    except (OSError, ssl.SSLError, UnicodeEncodeError) as e:
        raise WebConfigError(f"{shown(path)}: cannot load the certificate and key: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)


def _signature(files: tuple[str, ...]) -> tuple:
    out: list[tuple[int, ...] | None] = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class Watched:
    """The web config in use, read again when its file or a file it names changes
    (looked at most once a second, when asked). A file that no longer loads leaves
    the one in use: said in the log, counted in `reloads`."""

    CHECK_SECONDS = 1.0

    def __init__(self, path: str, cfg: WebConfig) -> None:
        self.path = path
        self.cfg = cfg
        self.reloads: Counter[str] = Counter()  # "ok" / "failed"
        self.last_ok = True
        self._seen = _signature(cfg.files)
        self._checked = time.monotonic()

    def current(self, now: float | None = None) -> WebConfig:
        now = time.monotonic() if now is None else now
        if now - self._checked >= self.CHECK_SECONDS:
            self._checked = now
            seen = _signature(self.cfg.files)
            if seen != self._seen:
                self._seen = seen
                self.reload("changed")
        return self.cfg

    def reload(self, why: str) -> bool:
        """Read the file again now (`why`: for the log). False: the one in use stays."""
        try:
            new = load(self.path)
        except WebConfigError as e:
            log.warning("web config %s: %s; the one in use stays", why, e)
            self.reloads["failed"] += 1
            self.last_ok = False
            return False
        if (new.tls is None) != (self.cfg.tls is None):
            log.warning("web config %s: TLS cannot be turned %s without a restart; the one in use stays",
                        why, "on" if new.tls is not None else "off")  # fmt: skip
            self.reloads["failed"] += 1
            self.last_ok = False
            return False
        self.cfg = new
        self._seen = _signature(new.files)
        self.reloads["ok"] += 1
        self.last_ok = True
        log.info("web config %s: %s read again", why, self.path)
        return True


def header(head: bytes, name: bytes) -> str | None:
    """One header's value from a request head (the first, case-insensitive)."""
    want = name.lower() + b":"
    for raw in head.split(b"\n")[1:]:  # CRLF, or a bare LF (RFC 9112 lets a server take it)
        line = raw.removesuffix(b"\r")
        if line[: len(want)].lower() == want:
            return line[len(want) :].strip().decode("latin-1")
    return None
