"""The `sockwatch` command: one module per subcommand."""

from __future__ import annotations

import typer

from sockwatch.cli import doctor, events, explain, live, ports, serve, snapshot, status

app = typer.Typer(
    name="sockwatch",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Which socket, and which process, owns each port and connection, live, from stable BPF hooks.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="markdown",  # paragraphs rewrap to the terminal; indented examples stay
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from sockwatch import version_text

        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_version,
        is_eager=True,
        help="Print sockwatch's version (and the git revision of a checkout) and exit.",
    ),
) -> None:
    """Which socket, and which process, owns each port and connection, live, from stable BPF hooks."""


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
    import sys

    if sys.argv[1:2] == ["serve"]:
        sys.argv[2:] = serve.exporter_spellings(sys.argv[2:])
    app()
