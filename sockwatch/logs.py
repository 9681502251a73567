"""The agent's log lines: `text` (sockwatch: message, as before), or as exporters write
them, `logfmt` (ts=... level=... msg="...") or `json` (one object a line), at the level
asked for (--log-level). Levels are the exporters' names: debug, info, warn, error."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "logfmt", "json")
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "error"}  # fmt: skip


def _ts(record: logging.LogRecord) -> str:
    return datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds")


class Logfmt(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'ts={_ts(record)} level={_NAMES.get(record.levelno, "info")} msg="{msg}"'


class Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": _ts(record), "level": _NAMES.get(record.levelno, "info"), "msg": record.getMessage()})


def setup(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """The root logger at `level`, writing `fmt` lines to `stream` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter({"logfmt": Logfmt(), "json": Json()}.get(fmt, logging.Formatter("sockwatch: %(message)s")))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
