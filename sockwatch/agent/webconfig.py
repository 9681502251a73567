"""`serve --web-config FILE`: TLS and basic auth for /metrics, in the file format the
Prometheus exporters share (prometheus/exporter-toolkit's web configuration):

    tls_server_config:
      cert_file: server.crt          # relative paths are from the file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional; needs client_ca_file
      client_ca_file: ca.crt
      min_version: TLS12             # optional
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')
    http_server_config:
      headers:                       # added to every answer; blank: not sent
        X-Content-Type-Options: nosniff
        Strict-Transport-Security: max-age=31536000
      http2: false                   # read, but answers are HTTP/1.1 either way

Everything is checked at start (the certificate and key load, the hashes are bcrypt),
so a bad file stops `serve` with one sentence rather than failing each scrape. /healthz
answers without auth (it says only "ok"): probes need not hold a password.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import ssl
from dataclasses import dataclass, field

from sockwatch import rootfile
from sockwatch.filters import shown

MAX_BYTES = 64 * 1024
_BCRYPT = re.compile(rb"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
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
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# a bcrypt of a random password: unknown users cost as much as known ones (no timing oracle)
_DUMMY = b"$2b$10$K.MS3hdyErc.VkEv.SY89OlTQlBDJTrkVf/oEAJh/Cgj31UqU/7sO"


class WebConfigError(ValueError):
    pass


@dataclass
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: bytes = b""  # header lines every answer carries (http_server_config.headers)
    _verified: dict[tuple[str, bytes], bool] = field(default_factory=dict)

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
    unknown = set(doc) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"{shown(path)}: unknown section {shown(str(sorted(map(str, unknown))[0]))} "
                             "(known: tls_server_config, basic_auth_users, http_server_config)")  # fmt: skip
    base = os.path.dirname(os.path.abspath(path))
    cfg = WebConfig()
    if doc.get("tls_server_config") is not None:
        cfg.tls = _tls(doc["tls_server_config"], base, path)
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
    return cfg


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


def _tls(section: object, base: str, path: str) -> ssl.SSLContext:
    if not isinstance(section, dict) or set(section) - _TLS_KEYS:
        raise WebConfigError(f"{shown(path)}: tls_server_config takes {', '.join(sorted(_TLS_KEYS))}")
    if not all(isinstance(v, str) for v in section.values()):
        raise WebConfigError(f"{shown(path)}: tls_server_config's values are strings")
    if not section.get("cert_file") or not section.get("key_file"):
        raise WebConfigError(f"{shown(path)}: tls_server_config needs cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for key, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in section:
            if section[key] not in _VERSIONS:
                raise WebConfigError(f"{shown(path)}: {key} is one of {', '.join(_VERSIONS)}")
            setattr(ctx, attr, _VERSIONS[section[key]])
    cert, key = (os.path.join(base, section[k]) for k in ("cert_file", "key_file"))
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"{shown(path)}: cannot load {shown(cert)} and {shown(key)}: {e}") from None
    auth = section.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{shown(path)}: client_auth_type is one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if ctx.verify_mode != ssl.CERT_NONE:
        if not section.get("client_ca_file"):
            raise WebConfigError(f"{shown(path)}: client_auth_type {auth} needs client_ca_file")
        try:
            ctx.load_verify_locations(os.path.join(base, section["client_ca_file"]))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"{shown(path)}: cannot load client_ca_file: {e}") from None
    return ctx


def header(head: bytes, name: bytes) -> str | None:
    """One header's value from a request head (the first, case-insensitive)."""
    want = name.lower() + b":"
    for raw in head.split(b"\n")[1:]:  # CRLF, or a bare LF (RFC 9112 lets a server take it)
        line = raw.removesuffix(b"\r")
        if line[: len(want)].lower() == want:
            return line[len(want) :].strip().decode("latin-1")
    return None
