"""The table's order and its JSON, kept across changes (order.SortedRows, agent.tablejson)
instead of being made again for each view: after any sequence of what the table does,
both are exactly what sorting and rendering the whole table give."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sockwatch import events as E
from sockwatch.agent.tablejson import BLOCK_END, TableJson
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState, render_json, sort_key
from sockwatch.order import INSERTS_IN_PLACE, MARK_EVERY, MOVES_PER_RESORT, SortedRows, marks_of, place
from tests.unit.test_tracker_events import OWNERS, Ns, diag, ev, tracker

STATES = [TcpState.ESTABLISHED, TcpState.FIN_WAIT2, TcpState.TIME_WAIT, TcpState.CLOSE, TcpState.SYN_SENT]


def row(
    cookie: int, port: int, state: int = TcpState.ESTABLISHED, rport: int = 443, comm: str | None = None
) -> SockRow:
    a = ipaddress.ip_address("10.0.0.1")
    return SockRow(cookie, IPPROTO_TCP, 4, state, a, port, ipaddress.ip_address("10.0.0.2"), rport, comm=comm)


# (op, cookie, port, state): add a row, remove it, change it in place (port and state: a new
# key, or invisible in CLOSE), rename its owner (moves nothing), or look (rows())
OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "change", "rename", "look"]),
        st.integers(1, 40),
        st.integers(1, 6),
        st.sampled_from(STATES),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@example(start=[1, 2, 3], ops=[("remove", 3, 1, TcpState.ESTABLISHED), ("change", 2, 6, TcpState.ESTABLISHED)])
@given(start=st.lists(st.integers(1, 40), unique=True, max_size=30), ops=OPS)
def test_sorted_rows_are_the_tables_rows_sorted_after_any_changes(start, ops):
    def marked(cookie: int) -> int:  # every third cookie a multiple of MARK_EVERY: marks come and go too
        return cookie * MARK_EVERY if cookie % 3 == 0 else cookie

    def same_marks() -> bool:
        cookies = order.cookies()
        return order.marks() == marks_of(cookies) and sum(order.marks()) == sum(c % 3 == 0 for c in cookies)

    start = [marked(c) for c in start]
    ops = [(op, marked(c), port, state) for op, c, port, state in ops]
    table = {c: row(c, c % 7 + 1) for c in start}
    order = SortedRows()
    assert order.rows(lambda: [r for r in table.values() if r.visible]) == sorted(table.values(), key=sort_key)
    for op, cookie, port, state in ops:
        r = table.get(cookie)
        if op == "add" and r is None:
            table[cookie] = r = row(cookie, port, state)
            order.add(r)
        elif op == "remove" and r is not None:
            order.remove(r)
            del table[cookie]
        elif op == "change" and r is not None:
            key, was = sort_key(r), r.visible
            r.local_port, r.state = port, state
            order.changed(r, key, was)
        elif op == "rename" and r is not None:
            r.comm = f"p{port}"
        if op == "look":
            assert order.rows(lambda: [r for r in table.values() if r.visible]) == sorted(
                (r for r in table.values() if r.visible), key=sort_key)  # fmt: skip
            assert order.cookies() == [r.cookie for r in order.rows(list)] and same_marks()
    assert order.rows(lambda: [r for r in table.values() if r.visible]) == sorted(
        (r for r in table.values() if r.visible), key=sort_key)  # fmt: skip
    assert order.cookies() == [r.cookie for r in order.rows(list)] and same_marks()


def test_placing_many_rows_sorts_whole_and_a_few_are_bisected():
    rows = [row(c, 1000 + c) for c in range(1, 1001)]
    order = SortedRows()
    assert order.rows(lambda: rows) == rows
    for r in rows[:10]:
        order.remove(r)
    assert not order.broken  # a few: placed
    for r in rows[10 : 10 + len(rows) // MOVES_PER_RESORT + 64]:
        order.remove(r)
    assert order.broken  # as many as a sort costs: sorted whole at the next look
    left = rows[10 + len(rows) // MOVES_PER_RESORT + 64 :]
    assert order.rows(lambda: left) == left
    new = row(5000, 1000)
    first = [r.cookie for r in rows[:3]]
    got, cookies, marks = place(rows[:3], first, marks_of(first), {rows[1].cookie: sort_key(rows[1])}, [new])
    assert got == sorted([rows[0], rows[2], new], key=sort_key) and cookies == [r.cookie for r in got]
    assert marks == marks_of(cookies)
    # few new rows are inserted where they go; many make the lists anew: the same result
    for n in (1, INSERTS_IN_PLACE, INSERTS_IN_PLACE + 1, 200):
        base = rows[::7]
        new_rows = [row(MARK_EVERY * (10_000 + i), 1000 + 3 * i) for i in range(n)]
        first = [r.cookie for r in base]
        got, cookies, marks = place(list(base), first, marks_of(first), {}, list(new_rows))
        assert got == sorted(base + new_rows, key=sort_key) and cookies == [r.cookie for r in got]
        assert marks == marks_of(cookies) and sum(marks) >= n


def test_table_json_is_render_json_and_renders_only_blocks_that_changed():
    rows = sorted((row(c, 2000 + c % 300, comm="web") for c in range(1, 5001)), key=sort_key)
    tj = TableJson()
    assert b"".join(tj.chunks(rows, None)) == render_json(rows)
    assert tj.rendered == len(rows)
    assert b"".join(tj.chunks(rows, set())) == render_json(rows) and tj.rendered == 0
    rows[100].comm = "renamed"  # in place: the table says so
    assert b"".join(tj.chunks(rows, {rows[100].cookie})) == render_json(rows)
    assert 0 < tj.rendered <= 10 * BLOCK_END
    del rows[2000]  # a row gone and one new: only their blocks
    rows.insert(3000, row(99_999, rows[3000].local_port, comm="new"))
    rows.sort(key=sort_key)
    assert b"".join(tj.chunks(rows, set())) == render_json(rows)
    assert 0 < tj.rendered <= 40 * BLOCK_END
    assert b"".join(TableJson().chunks([], None)) == render_json([]) == b"[]\n"


# one step of the kernel's connections: (cookie, what happens to it, its new port/state/inode)
STEP = st.tuples(st.integers(10, 30), st.sampled_from(["new", "state", "inode", "port", "gone"]),
                 st.integers(1, 4), st.sampled_from(STATES[:3]), st.integers(0, 3))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.lists(STEP, max_size=6), min_size=1, max_size=8),
       listeners=st.lists(st.integers(1, 9), unique=True, max_size=4))  # fmt: skip
def test_the_trackers_snapshot_and_json_match_a_whole_sort_and_render(steps, listeners):
    """Connection reads (rows new, changed in state, inode or port, gone), listeners from
    events and a UDP bind in any order: the kept order and the kept JSON blocks are what
    a whole sort and a whole render give, after each step."""
    t = tracker()
    tj = TableJson()
    for c in listeners:
        t.apply(ev(E.LISTEN, c, state=TcpState.LISTEN, local=("0.0.0.0", 8000 + c), owner=(1, "web")))

    def check() -> None:
        want = sorted(t.visible(), key=sort_key)
        got = t.snapshot()
        assert got == want
        rows, cookies, marks = t.ordered()
        assert rows == want and cookies == [r.cookie for r in want] and marks == marks_of(cookies)
        assert b"".join(tj.chunks(rows, t.take_touched(), cookies, marks)) == render_json(want)

    check()
    kernel: dict[int, list] = {}  # cookie -> [port, state, inode]
    for i, step in enumerate(steps):
        for cookie, what, port, state, inode in step:
            have = kernel.get(cookie)
            if what == "new" or have is None:
                kernel[cookie] = [port, state, inode]
            elif what == "gone":
                del kernel[cookie]
            else:
                have[{"port": 0, "state": 1, "inode": 2}[what]] = {"port": port, "state": state, "inode": inode}[what]
        read = [diag(c, st_, ("10.0.0.1", 40000 + p), ("10.0.0.2", 443), ino,
                     expires_ms=1000 if st_ == TcpState.TIME_WAIT else 0)
                for c, (p, st_, ino) in kernel.items()]  # fmt: skip
        t.apply_connections([(d, Ns) for d in read], i, OWNERS)
        check()
        if listeners and i % 2:
            t.apply(ev(E.STATE, listeners.pop(), state=TcpState.CLOSE, old=TcpState.LISTEN))  # a listener's end
            check()
        if i == 2:
            t.apply(ev(E.BIND, 77, IPPROTO_UDP, local=("0.0.0.0", 5353), owner=(2, "mdns")))
            check()
