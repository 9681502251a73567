"""Numbers from the command line, strictly: ASCII digits only (int() and float() also take
'1_000', ' +5', 'inf', 'nan' and other scripts' digits), bounds named in the message, and
the input quoted short."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence

from sockwatch.filters import shown

_INT = re.compile(r"[0-9]{1,20}")
_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


class ArgError(ValueError):
    pass


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _parse(text: str, name: str, lo: float, hi: float, form: re.Pattern[str], what: str) -> float:
    if not form.fullmatch(text.strip()):
        raise ArgError(f"{name} {shown(text)} is not {what} ({_num(lo)} to {_num(hi)})")
    x = float(text) if form is _DECIMAL else int(text)
    if not lo <= x <= hi:
        raise ArgError(f"{name} {shown(text)} is out of range: {_num(lo)} to {_num(hi)}")
    return x


def integer(text: str, name: str, lo: int, hi: int) -> int:
    return int(_parse(text, name, lo, hi, _INT, "a whole number"))


def seconds(text: str, name: str, lo: float, hi: float) -> float:
    return _parse(text, name, lo, hi, _DECIMAL, "a number of seconds")


def endpoint(
    text: str, name: str, lowest_port: int = 1, scoped: bool = False
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """ADDR:PORT or [V6ADDR]:PORT. An IPv6 address without brackets is refused (`::1:80`
    could be an address alone); so is a scope (`%eth0`) unless `scoped`: explain takes
    the device apart (--dev), where it is the packet's, not the address's."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        raise ArgError(f"{name} {shown(text)} is not ADDR:PORT ([ADDR]:PORT for IPv6)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ArgError(f"{name} {shown(text)}: write an IPv6 address in brackets, [ADDR]:PORT")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ArgError(f"{name} {shown(text)}: {shown(host)} is not an IP address") from None
    if not scoped and getattr(addr, "scope_id", None):
        raise ArgError(f"{name} {shown(text)}: a scoped address (%{shown(addr.scope_id)[1:-1]}) is not supported: "  # type: ignore[union-attr]
                       "give the address alone, and the device with --dev")  # fmt: skip
    return addr, integer(port, f"{name} port", lowest_port, 65535)


def listen_address(text: str, name: str) -> tuple[str, int] | None:
    """ADDR:PORT, [V6ADDR]:PORT, :PORT (every address, IPv4 and IPv6: host ""; port 0:
    any free one), or 'off' (None)."""
    if text.strip().lower() == "off":
        return None
    if text.startswith(":") and ":" not in text[1:]:
        return "", integer(text[1:], f"{name} port", 0, 65535)
    addr, port = endpoint(text, name, lowest_port=0, scoped=True)  # (a link-local address needs its device)
    return str(addr), port


def choices(values: Sequence[str], name: str, allowed: frozenset[str]) -> frozenset[str]:
    """Repeatable names, each one of `allowed`."""
    for v in values:
        if v not in allowed:
            raise ArgError(f"{name} {shown(v)} is not one of: {', '.join(sorted(allowed))}")
    return frozenset(values)


def directory(text: str, name: str) -> str:
    """An absolute path (it need not exist: a node without Kubernetes has no kubelet logs)."""
    if not text.startswith("/") or "\0" in text or len(text) > 4096:
        raise ArgError(f"{name} {shown(text)} is not an absolute path")
    if os.path.lexists(text) and not os.path.isdir(text):
        raise ArgError(f"{name} {shown(text)} is not a directory")
    return text


_URL_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,200}")


def url_path(text: str, name: str) -> str:
    """An HTTP path: begins with /, URL characters only, not /healthz (taken)."""
    if not _URL_PATH.fullmatch(text) or "//" in text or text in ("/healthz", "/readyz"):
        raise ArgError(f"{name} {shown(text)} is not a path such as /metrics (and not /healthz or /readyz)")
    return text
