"""The whole table as JSON, kept between asks in blocks of rows: after a few rows came,
went or changed, only their blocks are rendered again (rendering all 100,000 rows
costs ~0.25 s; the blocks' bytes are what one cached answer held before).

A block ends after a row whose cookie is a multiple of order.MARK_EVERY (a marked row), so its ends come from
the rows themselves, not from positions: a row added or removed changes the one block
it falls in, not every block after it. A block is known by its rows' cookies; a row
changed in place is told by the table (Tracker.take_touched)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from sockwatch.model import SockRow, row_json
from sockwatch.order import MARK_EVERY, marks_of

BLOCK_END = MARK_EVERY  # ~250 rows (~60 KiB) a block
_cookie = attrgetter("cookie")


class TableJson:
    def __init__(self) -> None:
        self._blocks: dict[tuple[int, ...], bytes] = {}
        self.rendered = 0  # rows rendered by the last call (the rest were kept)

    def clear(self) -> None:
        self._blocks = {}

    def chunks(
        self,
        rows: Sequence[SockRow],
        touched: set[int] | None,
        cookies: list[int] | None = None,
        marks: bytes | bytearray | None = None,
    ) -> list[bytes]:
        """model.render_json(rows) as chunks to send in turn. `touched`: cookies of rows
        changed since the last call (None: any may have). `cookies` and `marks`: the
        rows' cookies and marks in order (order.SortedRows), if the caller keeps them
        (else each row is read for them: a pass over the table in Python)."""
        old = self._blocks if touched is not None else {}
        new: dict[tuple[int, ...], bytes] = {}
        if cookies is None:
            cookies = list(map(_cookie, rows))
        if marks is None:
            marks = marks_of(cookies)
        ends = []
        at = marks.find(1)
        while at >= 0:  # (bytes.find, in C: ~400 calls at 100,000 rows)
            ends.append(at + 1)
            at = marks.find(1, at + 1)
        if not ends or ends[-1] != len(rows):
            ends.append(len(rows))
        out = [b"["]
        start = 0
        rendered = 0
        for end in ends:
            if end == start:
                continue  # (no rows at all)
            key = tuple(cookies[start:end])
            body = old.get(key)
            if body is None or (touched and not touched.isdisjoint(key)):
                body = ",\n".join(map(row_json, rows[start:end])).encode()
                rendered += end - start
            new[key] = body
            if start:
                out.append(b",\n")
            out.append(body)
            start = end
        out.append(b"]\n")
        self._blocks = new
        self.rendered = rendered
        return out
