"""typer.rich_utils imports rich.markdown (markdown-it: ~37 ms) and rich.traceback (~16 ms)
at its top, for help written in markdown and for pretty exceptions (off here). Most
commands never render either, so each is imported when first used instead: a third of
`sockwatch --help`'s start. tests/unit/test_cli_help.py holds the help byte for byte."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_DEFERRED = {"rich.markdown": "Markdown", "rich.traceback": "Traceback"}


def _deferred(module: str, name: str, stand_in: types.ModuleType) -> type:
    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        if sys.modules.get(module) is stand_in:
            del sys.modules[module]
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    # a class, not a function: rich_utils writes `Markdown | Text` in its annotations
    return type(name, (), {"__new__": new, "__module__": module})


def import_rich_utils() -> None:
    """Import typer.rich_utils with its two heavy imports deferred to their first use."""
    if "typer.rich_utils" in sys.modules:
        return
    stand_ins = {}
    for module, name in _DEFERRED.items():
        if module not in sys.modules:
            stand_in = types.ModuleType(module)
            setattr(stand_in, name, _deferred(module, name, stand_in))
            stand_ins[module] = sys.modules[module] = stand_in
    try:
        importlib.import_module("typer.rich_utils")
    finally:
        for module, stand_in in stand_ins.items():
            if sys.modules.get(module) is stand_in:
                del sys.modules[module]  # the next `import rich.markdown` loads the real one
