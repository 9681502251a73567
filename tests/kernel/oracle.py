"""The kernel's word: `ss -tuanpe` (iproute2) parsed into comparable rows."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Key:
    protocol: str
    local_address: Addr
    local_port: int
    remote_address: Addr | None
    remote_port: int
    state: str
    inode: int


@dataclass
class SsRow:
    key: Key
    cookie: int | None
    users: list[tuple[str, int]]  # (comm, pid)
    device: str | None = None  # the local side's %DEV: bound with SO_BINDTODEVICE


def _endpoint(text: str, v6_hint: bool) -> tuple[Addr | None, int]:
    host, _, port = text.rpartition(":")
    host = host.split("%", 1)[0]  # 127.0.0.1%lo: bound to a device
    if host.startswith("["):
        host = host[1:-1]
    p = 0 if port == "*" else int(port)
    if host == "*":
        # ss prints a dual-stack (IPv6, not v6only) wildcard as *
        return (ipaddress.IPv6Address(0) if v6_hint else None), p
    return ipaddress.ip_address(host), p


def parse(text: str) -> list[SsRow]:
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or f[0] not in ("tcp", "udp"):
            continue
        proto, state, local, peer = f[0], f[1], f[4], f[5]
        rest = " ".join(f[6:])
        la, lp = _endpoint(local, True)
        ra, rp = _endpoint(peer, False)
        if (ra is not None and ra == ipaddress.ip_address("0.0.0.0")) or rp == 0:
            ra, rp = None, 0
        if ra is not None and ra.version == 6 and int(ra) == 0:
            ra, rp = None, 0
        ino = int(m.group(1)) if (m := re.search(r"\bino:(\d+)", rest)) else 0
        cookie = int(m.group(1), 16) if (m := re.search(r"\bsk:([0-9a-f]+)", rest)) else None
        users = [(c, int(p)) for c, p in re.findall(r'\("([^"]*)",pid=(\d+)', rest)]
        assert la is not None
        host = local.rpartition(":")[0]
        device = host.split("%", 1)[1] if "%" in host else None
        out.append(SsRow(Key(proto, la, lp, ra, rp, state, ino), cookie, users, device))
    return out


def ss(netns: str | None = None) -> list[SsRow]:
    cmd = ["ss", "-tuanpeH"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return parse(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def key_of(row: dict) -> Key:
    """A sockwatch JSON row in the oracle's terms."""
    remote = ipaddress.ip_address(row["remote_address"]) if row["remote_address"] else None
    return Key(
        row["protocol"],
        ipaddress.ip_address(row["local_address"]),
        row["local_port"],
        remote,
        row["remote_port"] if remote is not None else 0,
        row["state"],
        row["inode"],
    )
