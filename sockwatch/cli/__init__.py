"""The `sockwatch` command: one module per subcommand."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from sockwatch.cli.lazyrich import import_rich_utils

import_rich_utils()  # before typer is imported: see lazyrich

import typer  # noqa: E402

from sockwatch.cli import doctor, events, explain, live, ports, serve, snapshot, status  # noqa: E402


def _typer(markup: str = "markdown") -> typer.Typer:
    return typer.Typer(
        name="sockwatch",
        context_settings={"help_option_names": ["-h", "--help"]},
        help="Which socket, and which process, owns each port and connection, live, from stable BPF hooks.",
        no_args_is_help=True,
        add_completion=True,
        rich_markup_mode=markup,  # type: ignore[arg-type]  # markdown: paragraphs rewrap, indented examples stay
        pretty_exceptions_enable=False,
    )


app = _typer()


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


COMMANDS: dict[str, Callable[..., None]] = {
    "live": live.live, "snapshot": snapshot.snapshot, "events": events.events, "ports": ports.ports,
    "explain": explain.explain, "serve": serve.serve, "status": status.status, "doctor": doctor.doctor,
}  # fmt: skip
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def _listing() -> typer.Typer:
    """The app as `sockwatch --help` shows it: each command by its name and help alone.
    typer builds every command's options before it prints the list (~15 ms of a
    ~150 ms start); the list needs none of them (a test holds the two outputs equal)."""
    listing = _typer("rich")  # (the list's first lines hold no markup: the same text, without markdown-it's parse)
    listing.callback()(_root)
    for name, fn in COMMANDS.items():
        first = inspect.cleandoc(fn.__doc__ or "").split("\n\n", 1)[0]
        listing.command(name, help=" ".join(first.split()))(_nothing)  # (the list shows the first paragraph)
    return listing


def _one(command: str) -> typer.Typer:
    """The app as `sockwatch COMMAND --help` shows it: that command whole, the others by
    name (a command's help shows no other; typer would build them all)."""
    one = _typer()
    one.callback()(_root)
    for name, fn in COMMANDS.items():
        one.command(name)(fn if name == command else _nothing)
    return one


def _nothing() -> None:
    pass


def _bind_app() -> typer.Typer:
    """`sockwatch explain bind ...` as a command of its own."""
    from sockwatch.cli.explain_bind import explain_bind

    one = _typer()
    one.command("bind")(explain_bind)
    return one


def main() -> None:
    """The command (sockwatch.entry.run calls it, under its Ctrl-C handler)."""
    import os
    import sys

    completing = any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ)  # (the shell asks: all of it)
    if sys.argv[1:] in ([], ["-h"], ["--help"]) and not completing:
        _listing()()
        return
    if len(sys.argv) == 3 and sys.argv[1] in COMMANDS and sys.argv[2] in ("-h", "--help") and not completing:
        _one(sys.argv[1])()
        return
    if sys.argv[1:3] == ["explain", "bind"]:  # a form of its own (explain's arguments are a packet's)
        _bind_app()(args=sys.argv[3:], prog_name="sockwatch explain bind")
        return
    if sys.argv[1:2] == ["serve"]:
        sys.argv[2:] = serve.exporter_spellings(sys.argv[2:])
    app()
