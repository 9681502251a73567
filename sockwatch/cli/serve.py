"""`sockwatch serve`: the long-running agent systemd and Kubernetes run."""

from __future__ import annotations

import logging

import typer

from sockwatch.agent.protocol import DEFAULT_SOCKET
from sockwatch.cli.errors import EXIT_RUNTIME, fail, friendly

HELP = """Load the BPF programs once, keep the socket table live, and answer local
queries (snapshot, status) on a root-only unix socket. Everything is attached through
BPF links: when the agent exits, however it exits, the kernel detaches it all."""


def serve(
    socket_path: str = typer.Option(DEFAULT_SOCKET, "--socket", help="Where to answer queries (root-only)."),
    reconcile_interval: float = typer.Option(
        30.0,
        "--reconcile-interval",
        min=1.0,
        help="Seconds between full comparisons with the kernel's tables (stretched to stay under 0.5% CPU).",
    ),
    max_udp: int = typer.Option(
        65536,
        "--max-udp",
        min=1024,
        max=16_777_216,
        help="UDP sockets whose owner the BPF side keeps until they close (TCP needs no BPF table).",
    ),
    ringbuf_pages: int = typer.Option(
        4096, "--ringbuf-pages", min=16, help="Ring buffer size in 4 KiB pages (power of two)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the agent does."),
) -> None:
    from sockwatch.agent.server import Agent, AgentRunning, Settings

    if ringbuf_pages & (ringbuf_pages - 1):
        raise fail(f"--ringbuf-pages {ringbuf_pages} is not a power of two", "use 256, 1024, 4096, ...", 2)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="sockwatch: %(message)s")
    agent = Agent(Settings(socket_path, reconcile_interval, max_udp=max_udp, ringbuf_pages=ringbuf_pages))
    with friendly():
        try:
            agent.start()
        except AgentRunning as e:
            agent.close()
            raise fail(str(e), "query it (sockwatch snapshot), or stop it first", EXIT_RUNTIME) from None
        except BaseException:
            agent.close()
            raise
        typer.echo(
            f"sockwatch: serving {len(agent.tracker.rows)} sockets on {socket_path} "
            f"(BPF loaded in {agent.load_seconds:.2f}s)",
            err=True,
        )
        try:
            agent.run()
        finally:
            agent.close()
