"""`sockwatch snapshot`: every inet socket on the host, now."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from sockwatch.agent import client
from sockwatch.cli import options as opt
from sockwatch.cli.errors import friendly


def snapshot(
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array of objects, one per socket.")] = False,
    protocol: opt.Proto = [],  # noqa: B006 (typer's list defaults are not shared state)
    port: opt.Port = [],  # noqa: B006
    addr: opt.Addr = [],  # noqa: B006
    state: opt.State = [],  # noqa: B006
    pid: opt.Pid = [],  # noqa: B006
    netns: opt.Netns = [],  # noqa: B006
    standalone: opt.Standalone = False,
    socket_path: opt.Socket = None,
) -> None:
    """Print every TCP and UDP socket on the host, in every network namespace, grouped
    the way the kernel looks them up.

    UDP by (local IP, local port), TCP listeners by (local IP, local port), TCP
    connections by the 4-tuple. Each row has its state, owner (pid, command, uid),
    network namespace, socket inode and cookie.

    Asks a running `sockwatch serve` when there is one (owners from the hooks);
    otherwise reads the kernel directly (sock_diag and one /proc scan). Filters
    combine with AND; a repeated option matches any of its values.

    Examples:

        sockwatch snapshot --proto udp --port 53

        sockwatch snapshot --state listen --addr 127.0.0.0/8 --json

        sockwatch snapshot --port 8000-8100 --netns blue
    """
    with friendly():
        f = opt.build_filters(protocol, port, addr, state, pid, netns)
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
