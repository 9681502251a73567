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


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _parse(text: str, name: str, lo: float, hi: float, form: re.Pattern[str], what: str) -> float:
    if not form.fullmatch(text.strip()):
        raise ArgError(f"{name} {shown(text)} is not {what} ({_num(lo)} to {_num(hi)})")
    x = float(text) if form is _DECIMAL else int(text)
    if not lo <= x <= hi:
        raise ArgError(f"{name} {shown(text)} is out of range: {_num(lo)} to {_num(hi)}")
    return x


def integer(text: str, name: str, lo: int, hi: int) -> int:
    return int(_parse(text, name, lo, hi, _INT, "a whole number"))


def seconds(text: str, name: str, lo: float, hi: float) -> float:
    return _parse(text, name, lo, hi, _DECIMAL, "a number of seconds")
