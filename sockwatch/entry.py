"""The `sockwatch` command's entry point. The CLI is imported and built here, under one
handler: importing it and typer's building of the commands take a moment, before
click's own Ctrl-C handling is in place, and a Ctrl-C then (Python 3.11 may wrap it in
RuntimeError when it lands inside a class's creation) is an interrupt, not a traceback."""

from __future__ import annotations

import sys


def _interrupt(e: BaseException) -> bool:
    return any(isinstance(x, KeyboardInterrupt) for x in (e, e.__cause__, e.__context__))


def run() -> None:
    try:
        from sockwatch.quick import snapshot_json

        if snapshot_json(sys.argv[1:]):
            return
        from sockwatch.cli import main

        main()
    except (KeyboardInterrupt, RuntimeError) as e:
        if not _interrupt(e):
            raise
        sys.stderr.write("\nAborted!\n")
        sys.exit(130)
