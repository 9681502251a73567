"""The visible rows in the kernel's grouping (model.sort_key), kept in order across
changes: a view after a few connections came and went moves those few rows instead of
sorting 100,000 again (a sort costs ~0.13 s there, nearly all of it in making keys).

The table tells it what it did: a row added, a row about to go, a row changed in place
(with the key and visibility it had), or "anything may have moved" (broken: the next
look sorts whole). A change that moves nothing (an owner, a device's name) needs no word."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from itertools import compress
from operator import attrgetter, not_

from sockwatch.model import SockRow, sort_key

# A row whose cookie is a multiple of this is marked (the whole-table JSON's blocks end
# after marked rows): kept with the order so a look finds the ends without a pass in Python.
MARK_EVERY = 251
REMOVALS_BY_BISECTION = 256  # past this, one pass by cookie beats a list deletion per row
INSERTS_IN_PLACE = 16  # up to this many new rows are inserted (a memmove each); past it, the lists are made anew
MOVES_PER_RESORT = 8  # more than 1/8 of the table moved: sorting whole is cheaper than placing each
_cookie = attrgetter("cookie")


class SortedRows:
    def __init__(self) -> None:
        self._rows: list[SockRow] = []
        self._cookies: list[int] = []  # the rows' cookies, in the same order (views that key on them)
        self._marks = bytearray()  # 1 where the row's cookie is a multiple of MARK_EVERY, else 0
        self._added: dict[int, SockRow] = {}  # cookie -> row to place (the last row given for it)
        self._removed: dict[int, tuple] = {}  # cookie -> the key it had when the list was made
        self._rekeyed = False  # a row in the list has a new key: it is found by cookie, not by bisection
        self.broken = True  # the list is not the table's: sort whole at the next look

    def add(self, row: SockRow) -> None:
        """A row now in the table (new, or back at its new place after moved())."""
        if not self.broken and row.visible:
            self._added[row.cookie] = row
            self._bound()

    def remove(self, row: SockRow) -> None:
        """A row leaving the table (unchanged since it was added or listed)."""
        if self.broken:
            return
        self._added.pop(row.cookie, None)
        if row.visible:
            self._removed.setdefault(row.cookie, sort_key(row))
            self._bound()

    def changed(self, row: SockRow, key: tuple, was_visible: bool) -> None:
        """A row changed in place, that had `key` and `was_visible` before."""
        if self.broken:
            return
        now = row.visible
        same_key = sort_key(row) == key
        if now == was_visible and (not now or same_key):
            return
        self._added.pop(row.cookie, None)
        if was_visible:
            self._removed.setdefault(row.cookie, key)
            self._rekeyed = self._rekeyed or not same_key
        self.add(row)
        self._bound()

    def _bound(self) -> None:
        if len(self._added) + len(self._removed) > len(self._rows) // MOVES_PER_RESORT + 64:
            self.break_order()  # nobody looked for a while: this is memory, and a sort costs no more

    def break_order(self) -> None:
        self.broken = True
        self._clear()

    def _clear(self) -> None:
        self._added.clear()
        self._removed.clear()
        self._rekeyed = False

    def rows(self, visible: Callable[[], list[SockRow]]) -> list[SockRow]:
        """The list in order (the caller's to read, not to change). `visible`: every
        visible row, for a whole sort."""
        if self.broken:
            self._rows = sorted(visible(), key=sort_key)
            self._cookies = list(map(_cookie, self._rows))
            self._marks = marks_of(self._cookies)
            self.broken = False
        elif self._added or self._removed:
            self._rows, self._cookies, self._marks = place(
                self._rows, self._cookies, self._marks, self._removed, list(self._added.values()), self._rekeyed
            )
        self._clear()
        return self._rows

    def cookies(self) -> list[int]:
        """The cookies of the list rows() last returned, in its order (the caller's to read)."""
        return self._cookies

    def marks(self) -> bytearray:
        """Which rows of that list are marked (MARK_EVERY), byte by byte (the caller's to read)."""
        return self._marks


def marks_of(cookies: list[int]) -> bytearray:
    return bytearray(map(not_, map(MARK_EVERY.__rmod__, cookies)))


def place(
    ordered: list[SockRow],
    cookies: list[int],
    marks: bytearray,
    removed: dict[int, tuple],
    added: list[SockRow],
    rekeyed: bool = False,
) -> tuple[list[SockRow], list[int], bytearray]:
    """`ordered` (sorted by sort_key; changed in place), its `cookies` and `marks`
    without the rows of `removed` (cookie -> the key it was sorted under; a cookie not in
    the list is skipped) and with `added` in their places. rekeyed: some row in
    `ordered` has a new key, so the list is not sorted by the keys its rows have now:
    rows are found by cookie."""
    if rekeyed or len(removed) > REMOVALS_BY_BISECTION:
        keep = list(map(not_, map(removed.__contains__, cookies)))
        ordered, cookies = list(compress(ordered, keep)), list(compress(cookies, keep))
        marks = bytearray(compress(marks, keep))
    else:
        for cookie, key in removed.items():
            i = bisect_left(ordered, key, key=sort_key)
            if i < len(ordered) and cookies[i] == cookie:
                del ordered[i], cookies[i], marks[i]
    if not added:
        return ordered, cookies, marks
    added.sort(key=sort_key)
    if len(added) <= INSERTS_IN_PLACE:
        for r in added:
            i = bisect_left(ordered, sort_key(r), key=sort_key)
            ordered.insert(i, r)
            cookies.insert(i, r.cookie)
            marks.insert(i, not r.cookie % MARK_EVERY)
        return ordered, cookies, marks
    out: list[SockRow] = []
    out_cookies: list[int] = []
    out_marks = bytearray()
    at = 0
    for r in added:
        i = bisect_left(ordered, sort_key(r), lo=at, key=sort_key)
        out += ordered[at:i]
        out_cookies += cookies[at:i]
        out_marks += marks[at:i]
        out.append(r)
        out_cookies.append(r.cookie)
        out_marks.append(not r.cookie % MARK_EVERY)
        at = i
    out += ordered[at:]
    out_cookies += cookies[at:]
    out_marks += marks[at:]
    return out, out_cookies, out_marks
