"""The `sockwatch` command: one module per subcommand."""

from __future__ import annotations

import sys

import typer

from sockwatch.cli import doctor, events, explain, live, ports, serve, snapshot, status

app = typer.Typer(
    name="sockwatch",
    help="Which socket, and which process, owns each port and connection, live, from stable BPF hooks.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="markdown",  # paragraphs rewrap to the terminal; indented examples stay
    pretty_exceptions_enable=False,
)
app.command("live")(live.live)
app.command("snapshot")(snapshot.snapshot)
app.command("events")(events.events)
app.command("ports")(ports.ports)
app.command("explain")(explain.explain)
app.command("serve")(serve.serve)
app.command("status")(status.status)
app.command("doctor")(doctor.doctor)


def main() -> None:
    try:
        app()
    except RuntimeError as e:
        # Ctrl-C while a module is imported can land inside a class's creation, which
        # Python 3.11 wraps in RuntimeError: still just an interrupt (click's own
        # handling of KeyboardInterrupt never sees it)
        if isinstance(e.__cause__, KeyboardInterrupt):
            sys.stderr.write("\nAborted!\n")
            sys.exit(130)
        raise
