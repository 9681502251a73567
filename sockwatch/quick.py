"""`sockwatch snapshot --json [--socket PATH]` answered by an agent without building the
CLI: the command scripts and exporters run in a loop, where importing typer and the
views (~80 ms) costs more than the agent takes to answer. Only that exact form; and
anything unexpected before the first byte of output (no agent, an error, a refusal)
goes to the full CLI, which answers it as always (standalone, or one clear sentence)."""

from __future__ import annotations

import os
import sys

# Filters().to_wire() (a test holds them equal)
NO_FILTERS: dict[str, list] = {"protocol": [], "port": [], "addr": [], "state": [], "pid": [], "netns": []}
EXIT_RUNTIME = 4  # as cli.errors


def socket_of(argv: list[str]) -> tuple[bool, str | None]:
    """(this is the simple form, its --socket or None)."""
    if not argv or argv[0] != "snapshot" or "--json" not in argv[1:]:
        return False, None
    rest = [a for a in argv[1:] if a != "--json"]
    if len(rest) == len(argv) - 2:  # --json once
        if not rest:
            return True, None
        if len(rest) == 2 and rest[0] == "--socket" and rest[1] and not rest[1].startswith("-"):
            return True, rest[1]
        if len(rest) == 1 and rest[0].startswith("--socket=") and len(rest[0]) > len("--socket="):
            return True, rest[0][len("--socket=") :]
    return False, None


def snapshot_json(argv: list[str]) -> bool:
    """Answer the simple form; False: the full CLI is to answer."""
    simple, path = socket_of(argv)
    if not simple:
        return False
    from sockwatch.agent import client

    begun = False

    def begin(_header: dict) -> None:
        nonlocal begun
        begun = True

    sys.stdout.flush()
    try:
        header = client.stream_snapshot(sys.stdout.fileno(), path, NO_FILTERS, on_header=begin)
    except client.AgentError as e:
        if not begun:
            return False
        sys.stderr.write(f"sockwatch: {e}\n")
        sys.exit(EXIT_RUNTIME)
    except BrokenPipeError:
        # the reader went away (| head): as the CLI, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.close()
        sys.exit(0)
    if header is None:
        return False  # no agent: the CLI reads the kernel itself
    if header.get("partial"):
        from sockwatch.render import say_partial

        say_partial(header)
    return True
