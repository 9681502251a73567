"""Numbers from the command line, strictly: ASCII digits only (int() and float() also take
'1_000', ' +5', 'inf', 'nan' and other scripts' digits), bounds named in the message, and
the input quoted short."""

from __future__ import annotations

import re

from sockwatch.filters import shown

_INT = re.compile(r"[0-9]{1,20}")
_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


class ArgError(ValueError):
    pass


def integer(text: str, name: str, lo: int, hi: int) -> int:
    if not _INT.fullmatch(text.strip()):
        raise ArgError(f"{name} {shown(text)} is not a whole number ({lo} to {hi})")
    n = int(text)
    if not lo <= n <= hi:
        raise ArgError(f"{name} {shown(text)} is out of range: {lo} to {hi}")
    return n


def seconds(text: str, name: str, lo: float, hi: float) -> float:
    if not _DECIMAL.fullmatch(text.strip()):
        raise ArgError(f"{name} {shown(text)} is not a number of seconds ({lo:g} to {hi:g})")
    x = float(text)
    if not lo <= x <= hi:
        raise ArgError(f"{name} {shown(text)} is out of range: {lo:g} to {hi:g} seconds")
    return x
