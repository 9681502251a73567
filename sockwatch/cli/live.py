"""`sockwatch live`: the socket table, full screen, as it changes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Annotated

import typer

from sockwatch.cli import args
from sockwatch.cli import options as opt
from sockwatch.cli.errors import EXIT_USAGE, fail, friendly


def live(
    refresh: Annotated[
        str, typer.Option("--refresh", metavar="SECONDS", help="Seconds between redraws, 0.1 to 60.")
    ] = "1",
    view: Annotated[
        str,
        typer.Option(
            "--view",
            metavar="VIEW",
            help="listeners, connections, processes, events, peers, drops",
            autocompletion=opt.completer(("listeners", "connections", "processes", "events", "peers", "drops")),
        ),
    ] = "listeners",
    filter_text: Annotated[
        str, typer.Option("--filter", metavar="FILTER", help="As the / key: proto=udp port=53 ...")
    ] = "",
    socket_path: opt.Socket = None,
) -> None:
    """A top-like, full-screen view of every socket on the host, live.

    Views: listeners and UDP sockets (keyed by local IP and port), TCP connections
    (keyed by the 4-tuple), what each process holds, the event stream, the peers of
    unconnected UDP sockets, and the sockets that dropped packets. The header
    counts sockets by protocol and state, ephemeral ports per namespace, events per
    second and losses.

    Keys: 1-6 or Tab switch views, / filters (snapshot's filter language), s sorts, r
    reverses, p or Space pauses, ? helps, q or Ctrl-C quits.

    Asks the running agent (only the rows on screen travel), or starts one in this
    process when none runs; the header says which.

    Examples:

        sockwatch live

        sockwatch live --view connections --filter "port=443" --refresh 0.5
    """
    from sockwatch.live import VIEWS

    try:
        seconds = args.seconds(refresh, "--refresh", 0.1, 60)
    except args.ArgError as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    if view not in VIEWS:
        raise fail(f"--view must be one of: {', '.join(VIEWS)}", code=EXIT_USAGE)
    if not sys.stdout.isatty():
        raise fail("sockwatch live needs a terminal", "use sockwatch snapshot or sockwatch events in pipes", EXIT_USAGE)
    from sockwatch.agent.inprocess import agent_socket
    from sockwatch.live import Live

    with friendly():
        filters = opt.parse_filter_text(filter_text)
        with agent_socket(socket_path) as (path, mode):
            app = Live(path, mode, seconds, view)
            app.filters, app.filter_text = filters, filter_text.strip()

            def ended(signum: int, _frame: object) -> None:
                """SIGTERM and SIGHUP end it as q does, the terminal restored on the way
                out; if that cannot finish (a terminal that is gone), a hard exit in 3 s,
                after removing an in-process agent's directory."""
                app.call_later(app.exit)

                def hard() -> None:
                    if mode == "in-process":
                        import shutil

                        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                    os._exit(128 + signum)

                timer = threading.Timer(3.0, hard)
                timer.daemon = True  # a normal exit before then does not wait for it
                timer.start()

            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, ended)
            app.run()
