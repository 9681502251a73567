"""Which rows changed since each reader last asked: the JSON blocks (to render only
what changed) and the owner rule (to check only new or changed rows while every owner
it named still runs under the same name). A row added counts as changed."""

from __future__ import annotations

from collections.abc import Callable


class ChangeLog:
    def __init__(self, readers: tuple[str, ...], limit: Callable[[], int]) -> None:
        # reader -> cookies changed since it last took them (None: any row may have)
        self._since: dict[str, set[int] | None] = dict.fromkeys(readers)
        self._limit = limit  # past this many, a reader's set becomes None: it was away long

    def mark(self, cookie: int) -> None:
        for name, s in self._since.items():
            if s is not None:
                s.add(cookie)
                if len(s) > self._limit():
                    self._since[name] = None

    def everything(self) -> None:
        """Any row may have changed (the table was read whole)."""
        for name in self._since:
            self._since[name] = None

    def take(self, reader: str) -> set[int] | None:
        """The cookies changed since this reader's last take (None: any may have)."""
        s = self._since[reader]
        self._since[reader] = set()
        return s
