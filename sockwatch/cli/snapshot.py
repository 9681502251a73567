"""`sockwatch snapshot`: every inet socket on the host, now."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from sockwatch.agent import client
from sockwatch.cli import options as opt
from sockwatch.cli.errors import friendly

SS = "ss's options"


def snapshot(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document: schema_version, timestamp, partial, sockets.")
    ] = False,
    lookups: Annotated[
        bool,
        typer.Option(
            "--lookups",
            help="Instead: socket lookups per destination (where the kernel delivered, and "
            "misses: closed ports probed), from the agent's sk_lookup hook.",
        ),
    ] = False,
    peers: Annotated[
        bool,
        typer.Option(
            "--peers",
            help="Instead: the remote peers of unconnected UDP sockets, with packets and last "
            "seen, from the agent's sk_lookup hook.",
        ),
    ] = False,
    dropped: Annotated[
        bool,
        typer.Option(
            "--drops",
            help="Instead: the sockets that dropped packets they were handed (receive buffer full, accept "
            "queue overflow, backlog, socket filter, protocol memory), by the kernel's drop reason, with "
            "each one's queue against its limit.",
        ),
    ] = False,
    top: Annotated[
        str, typer.Option("--top", metavar="N", help="With --lookups, --peers or --drops: this many, 1 to 10000.")
    ] = "100",
    protocol: opt.Proto = [],  # noqa: B006 (typer's list defaults are not shared state)
    port: opt.Port = [],  # noqa: B006
    addr: opt.Addr = [],  # noqa: B006
    state: opt.State = [],  # noqa: B006
    pid: opt.Pid = [],  # noqa: B006
    netns: opt.Netns = [],  # noqa: B006
    standalone: opt.Standalone = False,
    socket_path: opt.Socket = None,
    tcp: Annotated[bool, typer.Option("--tcp", "-t", help="TCP sockets (as ss -t).", rich_help_panel=SS)] = False,
    udp: Annotated[bool, typer.Option("--udp", "-u", help="UDP sockets (as ss -u).", rich_help_panel=SS)] = False,
    listening: Annotated[
        bool,
        typer.Option(
            "--listening", "-l", help="Listening sockets: TCP LISTEN, UDP UNCONN (as ss -l).", rich_help_panel=SS
        ),
    ] = False,
    _all: Annotated[
        bool,
        typer.Option(
            "--all", "-a", help="Every state: sockwatch's default (ss shows connections only).", rich_help_panel=SS
        ),
    ] = False,
    _numeric: Annotated[
        bool, typer.Option("--numeric", "-n", help="Numbers, not names: always so.", rich_help_panel=SS)
    ] = False,
    _processes: Annotated[
        bool, typer.Option("--processes", "-p", help="Owners: always shown.", rich_help_panel=SS)
    ] = False,
    extended: Annotated[
        bool,
        typer.Option("--extended", "-e", help="Also uid, inode, cookie and container (as ss -e).", rich_help_panel=SS),
    ] = False,
    no_header: Annotated[
        bool, typer.Option("--no-header", "-H", help="One line per socket, no titles (as ss -H).", rich_help_panel=SS)
    ] = False,
    ss_filter: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[FILTER]",
            show_default=False,
            help="ss's filter words: state NAME, exclude NAME, sport/dport [OP] :PORT, src/dst ADDR[:PORT], "
            "and, ( A or B ). Quote parentheses.",
        ),
    ] = None,
) -> None:
    """Print every TCP and UDP socket on the host, in every network namespace, grouped
    the way the kernel looks them up.

    UDP by (local IP, local port), TCP listeners by (local IP, local port), TCP
    connections by the 4-tuple. Each row has its state, owner (pid, command, uid),
    network namespace, socket inode and cookie. (UDP-Lite, SCTP and raw sockets are
    not shown: ss -w and ss -S list them.)

    Asks a running `sockwatch serve` when there is one (owners from the hooks);
    otherwise reads the kernel directly (sock_diag and one /proc scan). Filters
    combine with AND; a repeated option matches any of its values. ss's flags and
    filter words work too (a subset of ss's language: anything else is refused).

    Examples:

        sockwatch snapshot --proto udp --port 53

        sockwatch snapshot -tl sport = :443

        sockwatch snapshot -t state established '( dport = :ssh or sport = :ssh )'

        sockwatch snapshot --state listen --addr 127.0.0.0/8 --json

        sockwatch snapshot --port 8000-8100 --netns blue

        sockwatch snapshot --lookups --proto udp

        sockwatch snapshot --peers --port 53 --json

        sockwatch snapshot --drops --proto udp
    """
    with friendly():
        protocol = protocol + ["tcp"] * tcp + ["udp"] * udp
        state = state + ["listen", "unconn"] * listening
        f = opt.build_filters(protocol, port, addr, state, pid, netns, ss_filter)
        views = [name for name, on in (("lookups", lookups), ("peers", peers), ("drops", dropped)) if on]
        if views:
            _counted(views, top, f, as_json, standalone, socket_path)
            return
        if not standalone:
            if as_json:
                sys.stdout.flush()
                header = client.stream_snapshot(sys.stdout.fileno(), socket_path, f.to_wire())
                if header is not None:
                    _say_if_partial(header)
                    _say_if_none(header.get("rows"), f)
                    return
            else:
                answer = client.request("snapshot", socket_path, filters=f.to_wire())
                if answer is not None:
                    shown = _print_rows_from_json(answer[1], extended, not no_header)
                    _say_if_partial(answer[0])
                    _say_if_none(shown, f)
                    return
        from sockwatch.kernel import prereq
        from sockwatch.table import Tracker

        prereq.require_root()
        tracker = Tracker()
        tracker.bootstrap()
        tracker.fill_owners()
        tracker.name_devices()
        rows = tracker.snapshot(f)
        if as_json:
            from sockwatch.model import render_json
            from sockwatch.schema import SNAPSHOT_END, snapshot_head

            client.write_all(sys.stdout.fileno(), snapshot_head() + render_json(rows) + SNAPSHOT_END)
        else:
            from sockwatch.render import print_table

            print_table(rows, extended=extended, header=not no_header)
        _say_if_none(len(rows), f)


def _say_if_none(rows: object, f: object) -> None:
    """One line on stderr when nothing matched (stdout stays what it is: [] or the table's head)."""
    if rows == 0:
        filtered = not getattr(f, "empty", True)
        sys.stderr.write(f"sockwatch: no socket matched{' the filters' if filtered else ''}\n")


HOOKED_BY = {"lookups": "its sk_lookup hook", "peers": "its sk_lookup hook", "drops": "its drop hook"}


def _counted(views: list[str], top: str, f: object, as_json: bool, standalone: bool,
             socket_path: str | None) -> None:  # fmt: skip
    """--lookups / --peers / --drops: what the agent's hooks counted (only an agent has it)."""
    from sockwatch.cli import args
    from sockwatch.cli.errors import EXIT_RUNTIME, EXIT_USAGE, fail
    from sockwatch.render import print_drops, print_lookups, print_peers

    if len(views) > 1:
        raise fail(f"--{views[0]} and --{views[1]} are two views: ask for one", code=EXIT_USAGE)
    op = views[0]
    try:
        limit = args.integer(top, "--top", 1, 10_000)
    except args.ArgError as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    answer = None if standalone else client.request(op, socket_path, filters=f.to_wire(), limit=limit)  # type: ignore[attr-defined]
    if answer is None:
        raise fail(f"--{op} needs a running agent: the counts are kept by {HOOKED_BY[op]}",
                   "start one with 'sudo sockwatch serve'", EXIT_RUNTIME)  # fmt: skip
    try:
        report = json.loads(answer[1])
        if as_json:
            from sockwatch.schema import stamped

            sys.stdout.write(json.dumps(stamped(report, answer[0]), indent=2) + "\n")
        elif op == "lookups":
            print_lookups(report)
        elif op == "drops":
            print_drops(report)
        else:
            print_peers(report)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise client.AgentError(f"the agent's {op} answer is malformed") from None
    _say_if_partial(answer[0])


def _print_rows_from_json(body: bytes, extended: bool, header: bool) -> int:
    from sockwatch.model import SockRow
    from sockwatch.render import print_table

    try:
        rows = [SockRow.from_dict(d) for d in json.loads(body)]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise client.AgentError("the agent's answer is malformed: its rows do not parse") from None
    print_table(rows, extended=extended, header=header)
    return len(rows)


def _say_if_partial(header: dict) -> None:
    from sockwatch.render import say_partial

    say_partial(header)
