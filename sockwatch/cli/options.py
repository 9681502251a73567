"""Options several commands share: the filter language, and the agent's socket.

`--netns` takes what people have at hand: a name from `ip netns list`, a process id
(its namespace), or a namespace inode (as `stat -L -c %i /proc/PID/ns/net` or
`lsns -t net` print it). Names and pids are turned into inodes here, on the host that
asks; the agent only ever receives inodes."""

from __future__ import annotations

import os
import re
from typing import Annotated

import typer

from sockwatch import filters as flt
from sockwatch.agent.protocol import DEFAULT_SOCKET


def completer(values: tuple[str, ...] | list[str]):  # type: ignore[no-untyped-def]
    """Shell completion of a choice's values (sockwatch --install-completion)."""

    def complete(incomplete: str) -> list[str]:
        # in the case it was begun in (the shell keeps only what starts as typed; any case is taken)
        lower = incomplete.islower()
        return [v.lower() if lower else v for v in values if v.lower().startswith(incomplete.lower())]

    return complete


STATES = ("LISTEN", "ESTAB", "UNCONN", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2", "TIME-WAIT", "CLOSE-WAIT",
          "LAST-ACK", "CLOSING", "BOUND")  # fmt: skip

# (no -p: ss and lsof users read -p as "show processes")
Proto = Annotated[
    list[str],
    typer.Option("--proto", metavar="tcp|udp", help="tcp or udp.", autocompletion=completer(("tcp", "udp"))),
]
Port = Annotated[
    list[str], typer.Option("--port", metavar="PORT[-PORT]", help="Local or remote port, or a range: 8000-8100.")
]
Addr = Annotated[
    list[str], typer.Option("--addr", metavar="ADDR[/LEN]", help="Local or remote address or CIDR: 10.0.0.0/8, ::1.")
]
State = Annotated[
    list[str],
    typer.Option(
        "--state",
        metavar="STATE",
        help="ss's state names as the JSON has them, any case: LISTEN, ESTAB, TIME-WAIT...",
        autocompletion=completer(STATES),
    ),
]
Pid = Annotated[list[str], typer.Option("--pid", metavar="PID", help="Owner's process id.")]
Netns = Annotated[
    list[str],
    typer.Option("--netns", metavar="NETNS", help="Network namespace: a name (ip netns list), a pid, or an inode."),
]
Socket = Annotated[
    str | None,
    typer.Option(
        "--socket",
        metavar="PATH",
        help=f"The agent's socket; an error if no agent answers there. [default: {DEFAULT_SOCKET}]",
    ),
]

Standalone = Annotated[bool, typer.Option("--standalone", help="Do not ask a running agent; read the kernel directly.")]

_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,64}")


def netns_inode(text: str) -> int:
    """An inode from a namespace name, a pid or an inode; FilterError otherwise."""
    t = text.strip()
    if t.isascii() and t.isdigit() and len(t) <= 20:
        n = int(t)
        if 1 <= n <= flt.PID_MAX:  # a pid: namespace inodes are far above PID_MAX
            path = f"/proc/{n}/ns/net"
            try:
                return os.stat(path).st_ino
            except FileNotFoundError:
                raise flt.FilterError(f"--netns {n}: no process {n} (a pid, or an inode above {flt.PID_MAX})") from None
            except PermissionError:
                raise flt.FilterError(f"--netns {n}: cannot read {path}: run with sudo") from None
        return next(iter(flt.build(netns=[t]).netns))  # the inode's own bounds and message
    if not _NAME.fullmatch(t) or t in (".", ".."):
        raise flt.FilterError(f"--netns {flt.shown(text)} is not a namespace name, pid or inode")
    try:
        return os.stat(f"/run/netns/{t}").st_ino
    except OSError:
        raise flt.FilterError(f"--netns {flt.shown(t)}: no such namespace in ip netns list") from None


def build_filters(
    protocol: list[str],
    port: list[str],
    addr: list[str],
    state: list[str],
    pid: list[str],
    netns: list[str],
    ss_words: list[str] | None = None,
) -> flt.Filters:
    """The options' filters, and ss's filter words (ssfilter) after them: ANDed."""
    from sockwatch import ssfilter

    ss = ssfilter.parse(ss_words) if ss_words else {k: [] for k in ssfilter.KEYS}
    if state and ss["state"]:
        raise flt.FilterError("give states one way: --state/-l, or ss's 'state'/'exclude' words")
    return flt.build(
        protocol=protocol, port=port + ss["port"], addr=addr, state=state + ss["state"], pid=pid,
        netns=[str(netns_inode(n)) for n in netns], sport=ss["sport"], dport=ss["dport"], src=ss["src"],
        dst=ss["dst"],
    )  # fmt: skip


FILTER_WORDS = {"proto": "protocol", "port": "port", "addr": "addr", "state": "state", "pid": "pid", "netns": "netns"}


def parse_filter_text(text: str) -> flt.Filters:
    """The filter language of `snapshot`'s options, typed as one line (live's `/`):
    `--proto udp --port 53`, or `proto=udp port=53`; a bare `tcp`/`udp` is a protocol
    and a bare number a port."""
    import shlex

    try:
        words = shlex.split(text)
    except ValueError:
        raise flt.FilterError("unbalanced quotes in the filter") from None
    lists: dict[str, list[str]] = {k: [] for k in FILTER_WORDS.values()}
    i = 0
    while i < len(words):
        w = words[i]
        key, eq, value = w.lstrip("-").partition("=")
        if key in FILTER_WORDS and not eq and w.startswith("--"):
            if i + 1 >= len(words):
                raise flt.FilterError(f"{flt.shown(w)} needs a value")
            value, i = words[i + 1], i + 1
        elif key not in FILTER_WORDS or not eq:
            if w.lower() in ("tcp", "udp"):
                key, value = "proto", w
            elif w.isascii() and w.replace("-", "").isdigit():
                key, value = "port", w
            else:
                raise flt.FilterError(f"{flt.shown(w)} is not a filter: use proto=, port=, addr=, state=, pid=, netns=")
        lists[FILTER_WORDS[key]].append(value)
        i += 1
    return build_filters(lists["protocol"], lists["port"], lists["addr"], lists["state"], lists["pid"], lists["netns"])
