"""Human views of the table: grouped the way the kernel keys sockets."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from sockwatch.model import IPPROTO_UDP, SockRow, TcpState, fmt_addr

GROUPS = (
    ("udp", "UDP sockets, keyed by (local IP, local port); connected ones by the 4-tuple first"),
    ("listen", "TCP listeners, keyed by (local IP, local port)"),
    ("conn", "TCP connections, keyed by the 4-tuple"),
)
COLUMNS = ("NETNS", "PROTO", "STATE", "LOCAL", "REMOTE", "PID", "COMM", "UID", "INODE", "COOKIE", "CONTAINER")
NUMERIC = ("PID", "UID", "INODE", "COOKIE")


# C0 controls, DEL and C1 controls (ESC sequences, CSI 0x9b, ...) shown as \xNN
_CELL_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS = {c: v for c, v in _CELL_CONTROLS.items() if c != ord("\n")}  # our own lines stay lines


def printable(text: str) -> str:
    """Text that came from outside (a process name, the wire) made safe for a terminal."""
    return text.translate(_CONTROLS)


def printable_cell(text: str) -> str:
    """printable, on one line."""
    return text.translate(_CELL_CONTROLS)


def group_of(row: SockRow) -> str:
    if row.protocol == IPPROTO_UDP:
        return "udp"
    return "listen" if row.state == TcpState.LISTEN else "conn"


def endpoint(addr: object, port: int, family: int) -> str:
    a = fmt_addr(addr)  # type: ignore[arg-type]
    return f"[{a}]:{port}" if family == 6 else f"{a}:{port}"


def cells(r: SockRow) -> tuple[str, ...]:
    remote = endpoint(r.remote_address, r.remote_port, r.family) if r.is_connection else "*"
    proto = f"{r.proto_name}{r.family}"
    return (
        str(r.netns),
        proto,
        r.state_name,
        endpoint(r.local_address, r.local_port, r.family),
        remote,
        "" if r.pid is None else str(r.pid),
        printable_cell(r.comm or ""),
        "" if r.uid is None else str(r.uid),
        "" if r.inode is None else str(r.inode),
        str(r.cookie),
        printable_cell(r.container.label) if r.container is not None else "",
    )


def print_table(rows: Iterable[SockRow], out: TextIO = sys.stdout) -> None:
    by_group: dict[str, list[tuple[str, ...]]] = {g: [] for g, _ in GROUPS}
    for r in rows:
        by_group[group_of(r)].append(cells(r))
    rich_ok = out.isatty() and sum(len(v) for v in by_group.values()) <= 2000
    if rich_ok:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(file=out)
        for g, title in GROUPS:
            if not by_group[g]:
                continue
            t = Table(title=f"{title} ({len(by_group[g])})", title_justify="left", box=None, header_style="bold")
            for name in COLUMNS:
                t.add_column(name, no_wrap=True, justify="right" if name in NUMERIC else "left")
            for row in by_group[g]:
                t.add_row(*(Text(c) for c in row))  # Text: no markup is read from a process name
            console.print(t)
            console.print()
        return
    all_rows = [c for g, _ in GROUPS for c in by_group[g]]
    widths = [max([len(h)] + [len(c[i]) for c in all_rows]) for i, h in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    first = True
    for g, title in GROUPS:
        if not by_group[g]:
            continue
        if not first:
            out.write("\n")
        first = False
        out.write(f"# {title} ({len(by_group[g])})\n")
        out.write(fmt.format(*COLUMNS).rstrip() + "\n")
        for row in by_group[g]:
            out.write(fmt.format(*row).rstrip() + "\n")
