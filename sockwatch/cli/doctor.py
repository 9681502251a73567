"""`sockwatch doctor`: what this kernel offers sockwatch, and what to do about gaps."""

from __future__ import annotations

import os
import platform

import typer

from sockwatch.cli import options as opt
from sockwatch.cli.errors import EXIT_ENV


def _probe_hooks() -> list[tuple[str, bool, str]]:
    """Compile the real programs, load each and attach it by link for an instant, the
    way `serve` does (the sk_lookup program to doctor's own network namespace)."""
    from sockwatch.kernel import bpfload, drops, prereq
    from sockwatch.kernel.netns import NamespaceRegistry

    out: list[tuple[str, bool, str]] = []
    try:
        b = bpfload.compile_programs(bpfload.Sizes(16, 1024, 1024), bpfload.drop_reasons())  # (its reasons: counted)
    except bpfload.LoadError as e:
        return [("compile", False, f"{e.what}; {e.fix}")]
    except Exception as e:
        return [("compile", False, str(e))]
    out.append(("compile", True, "bcc compiled bpf/sockwatch.bpf.c; struct sizes match"))
    loaded = bpfload.Loaded(bpf=b)
    cg = prereq.cgroup2_path() or "/sys/fs/cgroup"
    loaded.cgroup_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for h in bpfload.HOOKS:
            try:
                lesser: list[str] = []
                os.close(bpfload.attach_one(b, h, loaded.cgroup_fd, lesser))
                note = f" ({h.fallback_note})" if lesser else ""
                out.append((h.what, True, "loads and attaches by BPF link" + note))
            except OSError as e:
                out.append((h.what, False, f"{e.strerror}; sockwatch runs without it: {h.effect}"))
        loaded.drop_reasons = bpfload.drop_reasons()
        bpfload.attach_drops(loaded)
        if loaded.drop_counts is not None:
            lacks = drops.missing_reasons(loaded.drop_reasons)
            note = (f" (this kernel names no {', '.join(lacks)}: those drops are shown without that reason, a "
                    "listener's attributed from its namespace's counters)") if lacks else ""  # fmt: skip
            out.append((bpfload.DROP_HOOK.what, True, "loads and attaches by BPF link" + note))
        else:
            why = next((m.why for m in loaded.missing if m.hook is bpfload.DROP_HOOK), "refused")
            out.append((bpfload.DROP_HOOK.what, False, f"{why}; sockwatch runs without it: "
                                                        f"{bpfload.DROP_HOOK.effect}"))  # fmt: skip
        bpfload.attach_lookup(loaded, NamespaceRegistry())
        if loaded.lookup is not None:
            out.append((bpfload.LOOKUP_HOOK.what, True, "loads and attaches by BPF link to each network namespace"))
        else:
            why = loaded.missing[-1].why if loaded.missing else "refused"
            out.append((bpfload.LOOKUP_HOOK.what, False, f"{why}; sockwatch runs without it: "
                                                          f"{bpfload.LOOKUP_HOOK.effect}"))  # fmt: skip
    finally:
        loaded.close()
    return out


def _agent_report(socket_path: str | None) -> list[str]:
    """What a running agent says of itself: its sk_lookup hook's reach (the namespace
    cap) and every note its answers carry (hooks missing, losses, caps reached)."""
    import json

    from sockwatch.agent import client
    from sockwatch.agent.protocol import DEFAULT_SOCKET
    from sockwatch.render import printable

    where = socket_path or DEFAULT_SOCKET
    try:
        answer = client.request("status", socket_path)
    except client.AgentError as e:
        return [f"-- agent      {printable(str(e))}"]
    if answer is None:
        return [f"-- agent      none answers at {where}"]
    try:
        st = json.loads(answer[1])
        lk, notes = st.get("lookup"), st.get("partial") or []
        out = [f"ok agent      answers at {where}: {int(st['sockets'])} sockets, {int(st['namespaces'])} namespaces"]
        if isinstance(lk, dict):
            over = int(lk.get("namespaces_over_cap", 0))
            out.append(f"{'!!' if over else 'ok'} sk_lookup   hooked in {int(lk['namespaces_hooked'])} namespaces "
                       f"(--max-lookup-namespaces {int(lk['namespaces_cap'])}"
                       f"{f'; {over} over it, not hooked' if over else ''})")  # fmt: skip
        out += [f"!! note       {printable(str(n))[:300]}" for n in notes[:10]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return ["!! agent      its status answer is malformed"]
    return out


def doctor(socket_path: opt.Socket = None) -> None:
    """Check what this machine offers sockwatch: root, bpf(), bcc, cgroup v2, kernel
    headers, and that every hook loads and attaches here (each for an instant); then
    what a running agent says it lacks (a hook refused, its namespace cap reached).

    Says what to do about each gap. Exit status 3 if anything is missing here (an
    agent's notes are reported, not counted).

    Example:

        sudo sockwatch doctor
    """
    from sockwatch.kernel import prereq

    typer.echo(f"kernel {platform.release()}")
    bad = False
    checks = prereq.checks()
    for c in checks:
        needed = c.name not in ("btf", "tracefs")
        mark = "ok " if c.ok else ("!! " if needed else "-- ")
        typer.echo(f"  {mark}{c.name:<10} {c.detail}")
        if not c.ok:
            if c.fix:
                typer.echo(f"               to fix: {c.fix}")
            bad = bad or needed
    if all(c.ok for c in checks if c.name in ("root", "bpf", "bcc", "cgroup2", "headers")):
        typer.echo("hooks:")
        for name, ok, detail in _probe_hooks():
            typer.echo(f"  {'ok ' if ok else '!! '}{name:<36} {detail}")
            bad = bad or not ok
        typer.echo("  -- kprobes, fentry/fexit, BPF LSM         not used: sockwatch relies only on stable hooks")
    else:
        typer.echo("hooks: not probed until the problems above are fixed")
    if os.geteuid() == 0 or socket_path is not None:
        typer.echo("running agent:")
        for line in _agent_report(socket_path):
            typer.echo(f"  {line}")
    if bad:
        raise typer.Exit(EXIT_ENV)
