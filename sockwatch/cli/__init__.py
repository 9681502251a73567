"""The `sockwatch` command: one module per subcommand."""

from __future__ import annotations

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
    """The command (sockwatch.entry.run calls it, under its Ctrl-C handler)."""
    app()
