"""`sockwatch events`: binds (asked, implicit, failed), listens, connects, accepts, state
changes and closes, as they happen."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from sockwatch.agent import client
from sockwatch.agent.protocol import EVENT_KINDS
from sockwatch.cli import options as opt
from sockwatch.cli.errors import EXIT_USAGE, fail, friendly
from sockwatch.containers import Container
from sockwatch.render import UNKNOWN, printable_cell


def events(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    kind: Annotated[
        list[str],
        typer.Option(
            "--kind",
            "-k",
            metavar="KIND",
            help=f"Only these: {', '.join(EVENT_KINDS)}.",
            autocompletion=opt.completer(EVENT_KINDS),
        ),
    ] = [],  # noqa: B006
    protocol: opt.Proto = [],  # noqa: B006
    port: opt.Port = [],  # noqa: B006
    addr: opt.Addr = [],  # noqa: B006
    state: opt.State = [],  # noqa: B006
    pid: opt.Pid = [],  # noqa: B006
    netns: opt.Netns = [],  # noqa: B006
    socket_path: opt.Socket = None,
) -> None:
    """Stream socket events as they happen, in every network namespace.

    Binds say how the port was set: asked for, port 0, or implicitly by connect,
    listen or sendto. Failed binds carry the errno and, for EADDRINUSE, who holds
    the port now (for EACCES, that the port is privileged). A TCP close carries the connection's lifetime: duration,
    bytes sent and received, retransmits, smoothed RTT. Events the kernel could not
    hand over (a full ring) are reported as a 'lost' line, never skipped silently.

    Streams from the running agent, or from one started in this process when none
    runs (several streams share one agent's hooks). Ctrl-C stops.

    Examples:

        sockwatch events --kind bind_fail

        sockwatch events --proto tcp --port 443 --kind close --json

        sockwatch events --netns blue
    """
    bad = [k for k in kind if k not in EVENT_KINDS]
    if bad:
        raise fail(f"--kind {printable_cell(bad[0][:40])!r} is not one of: {', '.join(EVENT_KINDS)}", code=EXIT_USAGE)
    from sockwatch.agent.inprocess import agent_socket

    with friendly():
        f = opt.build_filters(protocol, port, addr, state, pid, netns)
        try:
            with agent_socket(socket_path) as (path, mode):
                if mode == "in-process":
                    sys.stderr.write("sockwatch: no agent running: streaming from one started in this process\n")
                    sys.stderr.flush()
                wire, kinds = f.to_wire(), sorted(set(kind))
                if as_json:  # the agent's lines as they come: no parse, no re-encode
                    sys.stdout.flush()
                    client.stream("events", sys.stdout.fileno(), path, timeout=None, filters=wire, kinds=kinds)
                else:
                    for e in client.subscribe(path, filters=wire, kinds=kinds):
                        if e is None:
                            sys.stdout.flush()
                        else:
                            sys.stdout.write(describe(e) + "\n")
        except KeyboardInterrupt:
            return
    raise fail("the agent ended the event stream (it stopped, or this reader fell too far behind)")


def _ep(addr: object, port: object) -> str:
    a = str(addr)
    return f"[{a}]:{port}" if ":" in a and not a.startswith("::ffff:") else f"{a}:{port}"


def describe(e: dict) -> str:
    """One event as a line of text (everything from the agent is made printable)."""
    try:
        return printable_cell(_describe(e))
    except (KeyError, TypeError, ValueError):
        return printable_cell(f"(an event this version cannot show: {json.dumps(e)[:200]})")


def _describe(e: dict) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] * 1000) % 1000:03d}"
    if e["kind"] == "lost":
        if e.get("reason") == "stream":
            return f"{t} LOST      {e['events']} events skipped: the stream reached its CPU budget (the table has them)"
        return f"{t} LOST      {e['events']} events did not fit the ring (table resynced)"
    if e["kind"] == "miss":
        answer = "RST" if e["protocol"] == "tcp" else "ICMP port unreachable"
        return (f"{t} MISS      {e['protocol']:<3} port {e['local_port']}: {e['misses']} packets found no socket "
                f"({answer}), to {', '.join(e['addresses'])}  netns {e['netns']}")  # fmt: skip
    if e["kind"] == "drop":
        who = f"{e['pid']}/{e['comm']}" if e.get("pid") is not None else UNKNOWN
        why = ", ".join(f"{k} {v}" for k, v in e["reasons"].items())
        q = e.get("queue")
        full = ""
        if q:
            full = (f"; accept queue {q['used']}/{q['limit']}" if q["kind"] == "accept"
                    else f"; receive buffer {q['used']}/{q['limit']} B")  # fmt: skip
        return (f"{t} DROP      {e['protocol']:<3} {_ep(e['local_address'], e['local_port'])}  {who}  "
                f"netns {e['netns']}  {e['drops']} dropped: {why}{full}")  # fmt: skip
    who = f"{e['pid']}/{e['comm']}" if e.get("pid") is not None else UNKNOWN
    where = _ep(e["local_address"], e["local_port"])
    if e.get("remote_address"):
        where += " -> " + _ep(e["remote_address"], e["remote_port"])
    head = f"{t} {e['kind'].upper():<9} {e['protocol']:<3} {where}  {who}  netns {e['netns']}"
    label = Container.label_of(e.get("container"))
    head += f"  [{label}]" if label else ""
    extra = []
    if e.get("old_state"):
        extra.append(f"{e['old_state']} -> {e['state']}")
    if e.get("bind") and e["bind"] != "asked":
        extra.append({"port 0": "port chosen by the kernel", "no port": "port chosen at connect"}.get(
            e["bind"], f"implicit bind by {e['bind']}"))  # fmt: skip
    if e.get("errno"):
        holders = e.get("holders") or []
        held = "; ".join(
            f"held by {h['pid']}/{h['comm']} ({h['state']} {_ep(h['local_address'], h['local_port'])})"
            if h.get("pid") is not None
            else f"held by socket {h['cookie']} ({h['state']})"
            for h in holders[:3]
        )
        if e["errno"] == "EACCES":
            held = "a port below net.ipv4.ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE"
        extra.append(f"{e['errno']} ({e['error']})" + (f"; {held}" if held else ""))
        if e.get("explain"):
            extra.append(f"why: {e['explain']}")
    life = e.get("lifetime")
    if life:
        parts = []
        if life.get("seconds") is not None:
            parts.append(f"{life['seconds']:.3f}s")
        if "bytes_sent" in life:
            parts.append(f"sent {life['bytes_sent']} B, received {life['bytes_received']} B, "
                         f"{life['retransmits']} retransmits, srtt {life['srtt_us']} us")  # fmt: skip
        extra.append("lifetime " + ", ".join(parts))
    return head + ("  " + "; ".join(extra) if extra else "")
