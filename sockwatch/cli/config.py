"""`serve --config FILE`: the same settings as the flags, in TOML, one key per flag
(`listen = "0.0.0.0:9847"`, `metrics-drop-label = ["comm"]`). A flag given on the
command line or in the environment (SOCKWATCH_LISTEN, ...) wins over the file; the
file wins over the defaults. Every value goes through the flag's own parser, so a bad
value gets the same sentence either way.

The agent runs as root: the file must be a regular file no one but its owner (root)
can write, and is read whole only up to MAX_BYTES.
"""

from __future__ import annotations

import tomllib

from sockwatch import rootfile
from sockwatch.filters import shown

MAX_BYTES = 64 * 1024


class ConfigError(ValueError):
    pass


def load(path: str, scalars: set[str], lists: set[str]) -> dict[str, str | list[str]]:
    """The file's settings, as the strings a command line would have given.
    `scalars`: keys taking one value; `lists`: keys a flag may repeat."""
    raw = rootfile.read(path, "config file", MAX_BYTES, ConfigError)
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"the config file {shown(path)} is not TOML: {e}") from None
    out: dict[str, str | list[str]] = {}
    for key, value in doc.items():
        if key in lists:
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise ConfigError(f"{shown(path)}: {key} takes a string or a list of strings")
            out[key] = list(items)
        elif key in scalars:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ConfigError(f"{shown(path)}: {key} takes a string or a number, not {type(value).__name__}")
            out[key] = str(value)
        else:
            known = ", ".join(sorted(scalars | lists))
            raise ConfigError(f"{shown(path)}: unknown setting {shown(key)} (known: {known})")
    return out
