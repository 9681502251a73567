"""`sockwatch snapshot`: every inet socket on the host, now."""

from __future__ import annotations

import json
import sys

import typer

from sockwatch import filters as flt
from sockwatch.agent import client
from sockwatch.agent.protocol import DEFAULT_SOCKET
from sockwatch.cli.errors import friendly

HELP = """Print every TCP and UDP socket on the host, in every network namespace, grouped
the way the kernel looks them up: UDP by (local IP, local port), TCP listeners by
(local IP, local port), TCP connections by the 4-tuple. Each row has its state,
owner (pid, command, uid), network namespace (inode, as in /proc/PID/ns/net),
socket inode and cookie.

Asks a running `sockwatch serve` when there is one (instant, owners from the hooks);
otherwise reads the kernel directly (sock_diag and one /proc scan).

Filters combine with AND; a repeated option matches any of its values.

Examples:
  sockwatch snapshot --proto udp --port 53
  sockwatch snapshot --state listen --addr 127.0.0.0/8 --json
  sockwatch snapshot --port 8000-8100 --netns 4026532200
"""


def snapshot(
    as_json: bool = typer.Option(False, "--json", help="A JSON array of objects (one per socket)."),
    protocol: list[str] = typer.Option([], "--proto", "-p", help="tcp or udp."),
    port: list[str] = typer.Option([], "--port", help="Local or remote port, or a range like 8000-8100."),
    addr: list[str] = typer.Option([], "--addr", help="Local or remote address or CIDR (10.0.0.0/8, ::1)."),
    state: list[str] = typer.Option([], "--state", help="ss's state names: listen, estab, unconn, time-wait, ..."),
    pid: list[str] = typer.Option([], "--pid", help="Owner's process id."),
    netns: list[str] = typer.Option([], "--netns", help="Network namespace inode (stat -L -c %i /proc/PID/ns/net)."),
    standalone: bool = typer.Option(
        False, "--standalone", help="Do not ask a running agent; read the kernel directly."
    ),
    socket_path: str = typer.Option(
        None, "--socket", help=f"The agent's socket (an error if no agent answers there). [default: {DEFAULT_SOCKET}]"
    ),
) -> None:
    with friendly():
        f = flt.build(protocol=protocol, port=port, addr=addr, state=state, pid=pid, netns=netns)
        if not standalone:
            if as_json:
                sys.stdout.flush()
                header = client.stream("snapshot", sys.stdout.fileno(), socket_path, filters=f.to_wire())
                if header is not None:
                    _say_if_partial(header)
                    return
            else:
                answer = client.request("snapshot", socket_path, filters=f.to_wire())
                if answer is not None:
                    _print_rows_from_json(answer[1])
                    _say_if_partial(answer[0])
                    return
        from sockwatch.kernel import prereq
        from sockwatch.tracker import Tracker

        prereq.require_root()
        tracker = Tracker()
        tracker.bootstrap()
        tracker.fill_owners()
        rows = tracker.snapshot(f)
        if as_json:
            from sockwatch.model import render_json

            client.write_all(sys.stdout.fileno(), render_json(rows))
        else:
            from sockwatch.render import print_table

            print_table(rows)


def _print_rows_from_json(body: bytes) -> None:
    from sockwatch.model import SockRow
    from sockwatch.render import print_table

    try:
        rows = [SockRow.from_dict(d) for d in json.loads(body)]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise client.AgentError("the agent's answer is malformed: its rows do not parse") from None
    print_table(rows)


def _say_if_partial(header: dict) -> None:
    from sockwatch.render import printable

    partial = header.get("partial")
    if isinstance(partial, list) and partial:
        for why in partial[:10]:
            sys.stderr.write(f"sockwatch: note: {printable(str(why))[:300]}\n")
