"""`sockwatch status`: the agent's own health: counts, losses, repairs, memory."""

from __future__ import annotations

import json
import time

import typer

from sockwatch.agent import client
from sockwatch.agent.protocol import DEFAULT_SOCKET, MAX_BPF_STATS_SECONDS
from sockwatch.cli.errors import fail, friendly
from sockwatch.render import printable
from sockwatch.schema import stamped


def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable."),
    reconcile: bool = typer.Option(False, "--reconcile", help="Compare with the kernel now, then report."),
    socket_path: str = typer.Option(
        None, "--socket", metavar="PATH", help=f"The agent's socket. [default: {DEFAULT_SOCKET}]"
    ),
    bpf_stats: int = typer.Option(
        0,
        "--bpf-stats",
        metavar="SECONDS",
        help="Also measure what each BPF program costs the host over SECONDS (1-300): runs per second and "
        "ns per run, from the kernel's own counters (counting costs every BPF program ~20 ns a run, "
        "so it is on only for that window).",
    ),
) -> None:
    """The running agent's own health: sockets and namespaces, its CPU and memory,
    events per second, losses and repairs, clients, and any hook it runs without.

    Examples:

        sockwatch status

        sockwatch status --reconcile --json

        sockwatch status --bpf-stats 5
    """
    if not 0 <= bpf_stats <= MAX_BPF_STATS_SECONDS:
        raise fail(f"--bpf-stats takes 1 to {MAX_BPF_STATS_SECONDS} seconds", "for example: --bpf-stats 5")
    with friendly():
        before = None
        if bpf_stats:
            before = _ask(socket_path, bpf_stats=bpf_stats + 2)  # the window outlasts our wait
            t0 = time.monotonic()
            time.sleep(bpf_stats)
        st = _ask(socket_path, reconcile=reconcile)
    try:
        if before is not None:
            st["bpf_programs_window"] = _window(before["bpf_programs"], st["bpf_programs"], time.monotonic() - t0)
        text = json.dumps(stamped(st), indent=2) if as_json else _lines(st)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise fail("the agent's status answer is malformed") from None
    typer.echo(text if as_json else printable(text))


def _ask(socket_path: str | None, reconcile: bool = False, bpf_stats: int = 0) -> dict:
    args = {"bpf_stats": bpf_stats} if bpf_stats else {}  # (an older agent knows no such field)
    answer = client.request("status", socket_path, reconcile=reconcile, **args)
    if answer is None:
        raise fail(f"no sockwatch agent is running on {DEFAULT_SOCKET}", "start one with: sockwatch serve")
    try:
        st = json.loads(answer[1])
    except (ValueError, RecursionError):
        raise fail("the agent's status answer is malformed") from None
    if not isinstance(st, dict):
        raise fail("the agent's status answer is malformed")
    return st


def _window(before: dict, after: dict, seconds: float) -> dict:
    """Per hook over the window: runs per second, ns per run, and the share of one CPU."""
    out = {}
    for what, b in after.items():
        a = before.get(what, {"runs": 0, "run_ns": 0})
        runs, ns = b["runs"] - a["runs"], b["run_ns"] - a["run_ns"]
        out[what] = {
            "runs_per_second": round(runs / seconds, 1),
            "ns_per_run": round(ns / runs, 1) if runs else None,
            "cpu_percent": round(100 * ns / 1e9 / seconds, 3),
        }
    return out


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
        f"lost: ring buffer full {bpf['ringbuf_full']}; UDP and listener tables read {tr.get('kernel_reads', 0)} "
        "times",
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
    window = st.get("bpf_programs_window")
    if isinstance(window, dict):
        lines.append("BPF programs over the window (the kernel's counters):")
        lines.append(f"  {'hook':<44} {'runs/s':>10} {'ns/run':>8} {'CPU %':>7}")
        for what, w in sorted(window.items(), key=lambda kv: -kv[1]["cpu_percent"]):
            ns = "-" if w["ns_per_run"] is None else f"{w['ns_per_run']:.0f}"
            lines.append(f"  {what[:44]:<44} {w['runs_per_second']:>10.1f} {ns:>8} {w['cpu_percent']:>7.3f}")
    return "\n".join(lines)
