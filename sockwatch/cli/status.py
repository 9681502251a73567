"""`sockwatch status`: the agent's own health: counts, losses, repairs, memory."""

from __future__ import annotations

import json

import typer

from sockwatch.agent import client
from sockwatch.agent.protocol import DEFAULT_SOCKET
from sockwatch.cli.errors import fail, friendly
from sockwatch.render import printable


def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable."),
    reconcile: bool = typer.Option(False, "--reconcile", help="Compare with the kernel now, then report."),
    socket_path: str = typer.Option(None, "--socket", help=f"The agent's socket. [default: {DEFAULT_SOCKET}]"),
) -> None:
    """The running agent's own health: sockets and namespaces, its CPU and memory,
    events per second, losses and repairs, clients, and any hook it runs without.

    Examples:

        sockwatch status

        sockwatch status --reconcile --json
    """
    with friendly():
        answer = client.request("status", socket_path, reconcile=reconcile)
    if answer is None:
        raise fail(f"no sockwatch agent is running on {DEFAULT_SOCKET}", "start one with: sockwatch serve")
    try:
        st = json.loads(answer[1])
        text = json.dumps(st, indent=2) if as_json else _lines(st)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise fail("the agent's status answer is malformed") from None
    typer.echo(text if as_json else printable(text))


def _lines(st: dict) -> str:
    tr = st["tracker"]
    bpf = st["bpf"]
    cost = st["last_minute"]
    lines = [
        f"agent pid {st['pid']}, up {st['uptime_seconds']:.0f}s, "
        f"BPF loaded in {st['load_seconds']}s, {st['links']} links",
        f"sockets {st['sockets']} in {st['namespaces']} namespaces; {st['pending']} waiting for a kernel read",
        f"cost over the last {cost['seconds']:.0f}s: {cost['cpu_percent']}% of one CPU, "
        f"{cost['events_per_second']} events/s; memory {st['rss_bytes'] / 2**20:.1f} MiB, "
        f"cpu {st['cpu_seconds']}s total",
        f"BPF: {bpf['events']} records to the agent; TCP connections opened {bpf.get('tcp_opened', 0)} "
        f"(read from the kernel when asked: {tr.get('connection_syncs', 0)} reads, the last "
        f"{tr.get('last_connection_sync_seconds', 0)}s); "
        f"lost: ring buffer full {bpf['ringbuf_full']}, UDP owner map full {bpf['map_full']}",
        f"reconciles {tr['reconciles']} (last {tr['last_reconcile_seconds']}s), repairs {tr['repairs'] or 'none'}, "
        f"TIME-WAIT expired {tr['timewait_expired']}, resyncs {tr['resyncs']}, "
        f"events from vanished namespaces {tr['unknown_netns']}",
        f"clients now {st['clients']} ({st['subscribers']} streaming events; {st['stream_skipped']} records "
        f"skipped for the stream's CPU budget), dropped {st['clients_dropped'] or 'none'}",
    ]
    lk = st.get("lookup")
    if isinstance(lk, dict):
        lines.append(
            f"sk_lookup: {lk['namespaces_hooked']} of {lk['namespaces_known']} namespaces hooked; "
            f"lookups not counted {lk['lookups_uncounted']}, misses unattributed {lk['misses_unattributed']}, "
            f"UDP peers seen {lk['udp_peers_seen']}"
        )
    lines += [f"hook missing: {m['hook']}: {m['why']}" for m in st["hooks_missing"]]
    lines += [f"hook variant: {note}" for note in st.get("hooks_lesser", [])]
    lines += [f"note: {why}" for why in st["partial"]]
    return "\n".join(lines)
