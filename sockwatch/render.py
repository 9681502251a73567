"""Human views of the table: grouped the way the kernel keys sockets."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from sockwatch.model import IPPROTO_UDP, SockRow, TcpState, fmt_addr

GROUPS = (
    ("udp", "UDP sockets, keyed by (local IP, local port); connected ones by the 4-tuple first"),
    ("listen", "TCP listeners, keyed by (local IP, local port)"),
    ("conn", "TCP connections, keyed by the 4-tuple"),
)
COLUMNS = ("NETNS", "PROTO", "STATE", "LOCAL", "REMOTE", "PID", "COMM", "RECV-Q", "SEND-Q", "UID", "INODE", "COOKIE",
           "CONTAINER")  # fmt: skip
NUMERIC = ("PID", "RECV-Q", "SEND-Q", "UID", "INODE", "COOKIE")
# what the table shows without -e (as ss: the socket and its process; -e adds the rest)
NARROW = 7


# C0 controls, DEL and C1 controls (ESC sequences, CSI 0x9b, ...) shown as \xNN
_CELL_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS = {c: v for c, v in _CELL_CONTROLS.items() if c != ord("\n")}  # our own lines stay lines


def printable(text: str) -> str:
    """Text that came from outside (a process name, the wire) made safe for a terminal."""
    return text.translate(_CONTROLS)


def say_partial(header: dict) -> None:
    """An answer's notes of what it may lack, one line each on stderr (at most 10)."""
    partial = header.get("partial")
    if isinstance(partial, list) and partial:
        for why in partial[:10]:
            sys.stderr.write(f"sockwatch: note: {printable(str(why))[:300]}\n")


def printable_cell(text: str) -> str:
    """printable, on one line."""
    return text.translate(_CELL_CONTROLS)


def group_of(row: SockRow) -> str:
    if row.protocol == IPPROTO_UDP:
        return "udp"
    return "listen" if row.state == TcpState.LISTEN else "conn"


def endpoint(addr: object, port: int, family: int | str, device: str | None = None) -> str:
    """As ss prints it: 10.0.0.1:80, [::1]:80, and bound to a device 0.0.0.0%eth0:80
    (`family`: 4/6, or "ipv4"/"ipv6" as the JSON has it)."""
    a = fmt_addr(addr)  # type: ignore[arg-type]
    host = f"[{a}]" if family in (6, "ipv6") else a
    return f"{host}%{printable_cell(device)}:{port}" if device else f"{host}:{port}"


def family_digit(family: object) -> str:
    """4 or 6, as tables print a protocol with its family (tcp4, udp6), from 4/6 or the
    JSON's "ipv4"/"ipv6"."""
    from sockwatch.schema import FAMILY_NUMBERS  # (the JSON's names: one vocabulary)

    n = family if family in (4, 6) else FAMILY_NUMBERS.get(family) if isinstance(family, str) else None
    return "?" if n is None else str(n)


UNKNOWN = "-"  # one spelling for "not known" in every table and the event stream


def cells(r: SockRow) -> tuple[str, ...]:
    remote = endpoint(r.remote_address, r.remote_port, r.family) if r.is_connection else "*"
    proto = f"{r.proto_name}{r.family}"
    return (
        str(r.netns),
        proto,
        r.state_name,
        endpoint(r.local_address, r.local_port, r.family, r.device_label),
        remote,
        UNKNOWN if r.pid is None else str(r.pid),
        printable_cell(r.comm) if r.comm else UNKNOWN,
        UNKNOWN if r.recv_q is None else str(r.recv_q),
        UNKNOWN if r.send_q is None else str(r.send_q),
        UNKNOWN if r.uid is None else str(r.uid),
        UNKNOWN if r.inode is None else str(r.inode),
        str(r.cookie),
        printable_cell(r.container.label) if r.container is not None and r.container.label else UNKNOWN,
    )


def print_table(rows: Iterable[SockRow], out: TextIO = sys.stdout, extended: bool = False,
                header: bool = True) -> None:  # fmt: skip
    """The table, grouped as the kernel looks sockets up. Nothing is ever cut: on a
    terminal it is drawn only if it fits the width, else (and off a terminal) it is
    aligned text whose long lines the terminal wraps, as ss's do. extended: every
    column (ss -e); header=False: one line per socket, no titles (ss -H)."""
    n = len(COLUMNS) if extended else NARROW
    columns = COLUMNS[:n]
    by_group: dict[str, list[tuple[str, ...]]] = {g: [] for g, _ in GROUPS}
    for r in rows:
        by_group[group_of(r)].append(cells(r)[:n])
    all_rows = [c for g, _ in GROUPS for c in by_group[g]]
    widths = [max([len(h)] + [len(c[i]) for c in all_rows]) for i, h in enumerate(columns)]
    if header and out.isatty() and len(all_rows) <= 2000:
        from rich.console import Console

        console = Console(file=out)
        if sum(widths) + 2 * (len(widths) - 1) <= console.width:
            _rich_table(console, by_group, columns)
            return
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    first = True
    for g, title in GROUPS:
        if not by_group[g]:
            continue
        if header:
            if not first:
                out.write("\n")
            out.write(f"# {title} ({len(by_group[g])})\n")
            out.write(fmt.format(*columns).rstrip() + "\n")
        first = False
        for row in by_group[g]:
            out.write(fmt.format(*row).rstrip() + "\n")


def _rich_table(console: Any, by_group: dict[str, list[tuple[str, ...]]], columns: tuple[str, ...]) -> None:
    from rich.table import Table
    from rich.text import Text

    for g, title in GROUPS:
        if not by_group[g]:
            continue
        t = Table(title=f"{title} ({len(by_group[g])})", title_justify="left", box=None, header_style="bold")
        for name in columns:
            t.add_column(name, no_wrap=True, justify="right" if name in NUMERIC else "left")
        for row in by_group[g]:
            t.add_row(*(Text(c) for c in row))  # Text: no markup is read from a process name
        console.print(t)
        console.print()


def _owners(sockets: list[dict]) -> str:
    """The socket(s) a destination reaches, as 'pid/comm' (several: 'one of ...')."""
    if not sockets:
        return "(none: RST / port unreachable)"
    names = [f"{s['pid']}/{s['comm'] or ''}" if s.get("pid") is not None else f"cookie {s['cookie']}" for s in sockets]
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
    return printable_cell(("one of " if len(names) > 1 else "") + shown)


def _aligned(title: str, header: tuple[str, ...], rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out.write(f"# {title}\n" + fmt.format(*header).rstrip() + "\n")
    for r in rows:
        out.write(fmt.format(*r).rstrip() + "\n")


def print_lookups(report: dict, out: TextIO = sys.stdout) -> None:
    """`snapshot --lookups`: destinations by lookups, then closed ports by misses."""
    dests = report["destinations"]
    if not report["matched"]:
        out.write("no socket lookups counted yet (TCP SYNs, UDP datagrams to unconnected sockets)\n")
    rows = [(str(d["netns"]), d["protocol"] + family_digit(d["family"]), endpoint(d["address"], d["port"], d["family"]),
             str(d["lookups"]), str(d["misses"]), _owners(d["sockets"]) + (" (reuseport)" if d["reuseport"] else ""))
            for d in dests]  # fmt: skip
    if dests:
        _aligned(f"Socket lookups by destination ({len(dests)} of {report['matched']})",
                 ("NETNS", "PROTO", "DESTINATION", "LOOKUPS", "MISSES", "GOES TO"), rows, out)  # fmt: skip
    closed = report["closed_ports"]
    if closed:
        out.write("\n")
        rows = [(str(c["netns"]), c["protocol"], str(c["port"]), str(c["misses"]), str(c["addresses"]),
                 "open now" if c["open_now"] else "closed") for c in closed]  # fmt: skip
        _aligned("Ports probed that no socket answered (misses: RST / ICMP port unreachable)",
                 ("NETNS", "PROTO", "PORT", "MISSES", "ADDRESSES", "NOW"), rows, out)  # fmt: skip
    t = report["totals"]
    out.write(f"\n{t['namespaces_hooked']} of {t['namespaces_known']} network namespaces hooked")
    if t["lookups_uncounted"]:
        out.write(f"; {t['lookups_uncounted']} lookups not counted (counter map full: --max-lookup-keys)")
    if t["misses_unattributed"]:
        out.write(f"; {t['misses_unattributed']} misses in namespaces not yet hooked")
    out.write("\n")


def print_peers(report: dict, out: TextIO = sys.stdout) -> None:
    """`snapshot --peers`: who sends to unconnected UDP sockets, most packets first."""
    import time

    now = time.time()
    peers = report["peers"]
    if not peers:
        out.write("no UDP peers seen yet (datagrams to unconnected UDP sockets)\n")
        return
    rows = [(str(p["netns"]), endpoint(p["local_address"], p["local_port"], p["family"]),
             endpoint(p["remote_address"], p["remote_port"], p["family"]), str(p["packets"]),
             f"{max(0.0, now - p['last_seen']):.0f}s ago", _owners(p["sockets"]))
            for p in peers]  # fmt: skip
    _aligned(f"UDP peers of unconnected sockets ({len(peers)} of {report['matched']})",
             ("NETNS", "LOCAL", "PEER", "PACKETS", "LAST SEEN", "SOCKET"), rows, out)  # fmt: skip
    t = report["totals"]
    if t.get("udp_peers_evicted"):
        out.write(f"\n{t['udp_peers_evicted']} peers were evicted, least recently seen first "
                  f"(--max-udp-peers {t['udp_peers_capacity']})\n")  # fmt: skip


def print_drops(report: dict, out: TextIO = sys.stdout) -> None:
    """`snapshot --drops`: sockets that dropped packets, most first, by the kernel's reason."""
    socks = report["sockets"]
    if not socks:
        out.write(
            "no socket has dropped a packet it was handed (receive buffer, accept queue, backlog, filter, memory)\n"
        )
    rows = []
    for d in socks:
        owner = f"{d['pid']}/{d['comm'] or ''}" if d.get("pid") is not None else UNKNOWN
        reasons = ", ".join(f"{k} {v}" for k, v in d["reasons"].items())
        if d["earlier"]:
            reasons = (reasons + ", " if reasons else "") + f"before sockwatch {d['earlier']}"
        rows.append((str(d["netns"]), d["protocol"] + family_digit(d["family"]),
                     endpoint(d["local_address"], d["local_port"], d["family"]) + (
                         " " + endpoint(d["remote_address"], d["remote_port"], d["family"])
                         if d["remote_address"] else ""),
                     printable_cell(owner), str(d["drops"]), _queue_cell(d["queue"]), reasons or "-"))  # fmt: skip
    if socks:
        _aligned(f"Packets dropped by the socket they reached ({len(socks)} of {report['matched']})",
                 ("NETNS", "PROTO", "SOCKET", "OWNER", "DROPS", "QUEUE", "REASONS"), rows, out)  # fmt: skip
    missed = report.get("no_socket") or []
    if missed:
        out.write("\n")
        unsocketed = [(str(c["netns"]), c["protocol"], str(c["port"]), str(c["misses"]),
                       "open now" if c["open_now"] else "closed") for c in missed]  # fmt: skip
        _aligned("Packets that found no socket (NO_SOCKET: RST / ICMP port unreachable), by port",
                 ("NETNS", "PROTO", "PORT", "MISSES", "NOW"), unsocketed, out)  # fmt: skip
    if report.get("reasons_missing"):
        out.write(f"\n{report['reasons_missing']}\n")
    if report.get("uncounted"):
        out.write(f"\n{report['uncounted']} drops not counted by reason (the drop map was full)\n")


def _queue_cell(q: dict | None) -> str:
    """A listener's accept queue against its backlog (3/128), a UDP socket's receive
    memory against its buffer (1664/2304 B); '-' for a connection."""
    if not q:
        return "-"
    unit = "" if q["kind"] == "accept" else " B"
    return f"{q['used']}/{q['limit']}{unit}"
