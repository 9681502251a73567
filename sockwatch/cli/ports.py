"""`sockwatch ports`: how close each destination is to running out of ephemeral ports."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from sockwatch.agent import client
from sockwatch.cli import args
from sockwatch.cli import options as opt
from sockwatch.cli.errors import EXIT_USAGE, fail, friendly
from sockwatch.render import printable_cell
from sockwatch.schema import stamped


def ports(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: namespaces and pressure.")] = False,
    top: Annotated[str, typer.Option("--top", metavar="N", help="Show this many destinations, 1 to 100000.")] = "20",
    protocol: opt.Proto = [],  # noqa: B006
    addr: opt.Addr = [],  # noqa: B006
    netns: opt.Netns = [],  # noqa: B006
    standalone: opt.Standalone = False,
    socket_path: opt.Socket = None,
) -> None:
    """Ephemeral-port use per destination, worst first, against each namespace's real
    range (net.ipv4.ip_local_port_range minus ip_local_reserved_ports).

    TCP: ports used toward one (local IP, remote IP, remote port), TIME-WAIT
    included and shown apart, out of what the range leaves after listeners' ports;
    at 100% the next connect() there fails with EADDRNOTAVAIL. UDP: ports used per
    local IP (an implicit UDP bind cannot share a port, whatever the peer).

    Examples:

        sockwatch ports

        sockwatch ports --netns blue --proto tcp --json
    """
    try:
        shown = args.integer(top, "--top", 1, 100_000)
    except args.ArgError as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    with friendly():
        f = opt.build_filters(protocol, [], addr, [], [], netns)
        answer = None if standalone else client.request("ports", socket_path, filters=f.to_wire())
        if answer is not None:
            try:
                report = json.loads(answer[1])
                text = json.dumps(stamped(report, answer[0]), indent=2) if as_json else _table(report, shown)
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                raise client.AgentError("the agent's ports answer is malformed") from None
        else:
            from sockwatch.kernel import prereq
            from sockwatch.table import Tracker
            from sockwatch.tally import ports_report

            prereq.require_root()
            t = Tracker()
            t.bootstrap()
            rows, ranges = t.snapshot(f), t.port_ranges()
            report = ports_report(rows, ranges)
            text = json.dumps(stamped(report), indent=2) if as_json else _table(report, shown)
        sys.stdout.write(printable_cell(text).replace("\\x0a", "\n") + "\n")


def _table(report: dict, top: int) -> str:
    lines = ["NETNS        EPHEMERAL     RESERVED  IN USE  AVAILABLE  PRIVILEGED"]
    for n in report["namespaces"]:
        lo, hi = n["range"]
        priv = n["classes"]["privileged"]
        below = f"1-{priv[1]}" if priv else "none"
        lines.append(
            f"{n['netns']:<12} {lo}-{hi:<7} {n['reserved']:>8}  {n['in_use']:>6}  {n['available']:>9}  {below}"
        )
    pressure = report["pressure"]
    lines.append("")
    if not pressure:
        lines.append("no ephemeral ports in use")
        return "\n".join(lines)
    lines.append("USED%   USED  TIME-WAIT  AVAILABLE  PROTO  NETNS        LOCAL -> DESTINATION")
    for p in pressure[:top]:
        dest = f"{p['remote_address']}:{p['remote_port']}" if p["remote_address"] else "(any peer)"
        lines.append(
            f"{p['percent']:>5.1f}  {p['used']:>5}  {p['time_wait']:>9}  {p['available']:>9}  "
            f"{p['protocol']:<5}  {p['netns']:<12} {p['local_address']} -> {dest}"
        )
    if len(pressure) > top:
        lines.append(f"... {len(pressure) - top} more (--top)")
    return "\n".join(lines)
