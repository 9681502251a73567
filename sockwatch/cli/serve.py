"""`sockwatch serve`: the long-running agent systemd and Kubernetes run."""

from __future__ import annotations

import logging

import typer

from sockwatch.agent import sockpath
from sockwatch.agent.protocol import DEFAULT_SOCKET
from sockwatch.cli import args
from sockwatch.cli.errors import EXIT_RUNTIME, EXIT_USAGE, fail, friendly
from sockwatch.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT


def serve(
    socket_path: str = typer.Option(DEFAULT_SOCKET, "--socket", help="Where to answer queries (root-only)."),
    reconcile_interval: str = typer.Option(
        "30",
        "--reconcile-interval",
        help="Seconds between full comparisons with the kernel's tables, 1 to 86400 "
        "(stretched to stay under 0.5% CPU).",
    ),
    max_udp: str = typer.Option(
        "65536",
        "--max-udp",
        help="UDP sockets whose owner the BPF side keeps until they close, 1024 to 16777216 (TCP needs no BPF table).",
    ),
    ringbuf_pages: str = typer.Option(
        "4096", "--ringbuf-pages", help="Ring buffer size in 4 KiB pages: a power of two, 16 to 65536."
    ),
    listen: str = typer.Option(
        f"127.0.0.1:{DEFAULT_METRICS_PORT}",
        "--listen",
        help="Where to serve /metrics and /healthz: ADDR:PORT ([ADDR]:PORT for IPv6; port 0 picks a free one), "
        "or 'off'. Loopback by default: the metrics name processes and addresses.",
    ),
    stream_cpu: str = typer.Option(
        "25",
        "--stream-cpu",
        help="Percent of one CPU the event stream may take while someone subscribes, 1 to 100; "
        "past it, records are skipped for the stream and subscribers are told how many.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the agent does."),
) -> None:
    """Run the agent: load the BPF programs once, keep the socket table live, and
    answer local queries on a root-only unix socket.

    `snapshot`, `status`, `events`, `live` and `ports` ask it. Everything is attached
    through BPF links: when the agent exits, however it exits, the kernel detaches it
    all. A kernel that refuses one hook runs without it (degraded, and every answer
    says so). One agent per socket path.

    Examples:

        sudo sockwatch serve

        sudo sockwatch serve --socket /run/sockwatch/agent.sock --max-udp 262144
    """
    from sockwatch.agent.server import Agent, Settings

    try:
        socket_path = sockpath.validate(socket_path)
        interval = args.seconds(reconcile_interval, "--reconcile-interval", 1, 86400)
        udp = args.integer(max_udp, "--max-udp", 1024, 16_777_216)
        pages = args.integer(ringbuf_pages, "--ringbuf-pages", 16, 65536)
        stream_share = args.integer(stream_cpu, "--stream-cpu", 1, 100) / 100
        where = args.listen_address(listen, "--listen")
    except (sockpath.PathError, args.ArgError) as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    if pages & (pages - 1):
        raise fail(f"--ringbuf-pages {pages} is not a power of two", "use 256, 1024, 4096, ...", EXIT_USAGE)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="sockwatch: %(message)s")
    agent = Agent(
        Settings(socket_path, interval, max_udp=udp, ringbuf_pages=pages, stream_cpu=stream_share, listen=where)
    )
    with friendly():
        try:
            agent.start()
        except sockpath.AgentRunning as e:
            agent.close()
            raise fail(str(e), "query it (sockwatch snapshot), or stop it first", EXIT_RUNTIME) from None
        except sockpath.PathError as e:
            agent.close()
            raise fail(str(e), "choose another --socket path", EXIT_USAGE) from None
        except BaseException:
            agent.close()
            raise
        typer.echo(
            f"sockwatch: serving {len(agent.tracker.rows)} sockets on {socket_path}"
            + (f", metrics on http://{agent.metrics_address}/metrics" if agent.metrics_address else "")
            + " "
            f"(BPF loaded in {agent.load_seconds:.2f}s)",
            err=True,
        )
        try:
            agent.run()
        finally:
            agent.close()
