"""What a screenful asks of the table (pure; no I/O): a window of sorted, filtered rows
plus the counts a header shows, so that `live` never pulls 100,000 rows to draw 40."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any

from sockwatch.filters import Filters
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, STATE_NAMES, SockRow, TcpState

# What each sort orders by first; ties keep the table's order (sort_key: the kernel's
# grouping), as the window sorts the tracker's sorted table stably. "local" is that order.
SORT_KEYS: dict[str, Callable[[SockRow], Any] | None] = {
    "local": None,
    "remote": lambda r: (int(r.remote_address) if r.remote_address is not None else -1, r.remote_port),
    "state": attrgetter("state_name"),
    "protocol": attrgetter("protocol"),
    "pid": lambda r: r.pid if r.pid is not None else -1,
    "comm": lambda r: r.comm or "",
    "age": lambda r: -r.born_ns,  # newest first
    "netns": attrgetter("netns"),
}


def select(rows: list[SockRow], view: str) -> list[SockRow]:
    """The rows a view shows (one comprehension: this runs over the whole table)."""
    if view == "listeners":  # what receives new packets by (IP, port): TCP listeners and UDP sockets
        return [r for r in rows if r.protocol == IPPROTO_UDP or r.state == TcpState.LISTEN]
    if view == "connections":  # keyed by the 4-tuple
        return [r for r in rows if r.protocol == IPPROTO_TCP and r.state != TcpState.LISTEN]
    return rows


def counts(rows: Iterable[SockRow]) -> dict:
    """Sockets by protocol and state (ss's names), and listeners."""
    return counts_of(Counter(map(attrgetter("protocol", "state"), rows)))  # C-level: no call per row


def counts_of(by: Mapping[tuple[int, int], int]) -> dict:
    """counts() from sockets already counted by (protocol, state)."""
    out: dict[str, Any] = {"total": sum(by.values()), "tcp": {}, "udp": {}}
    for (proto, state), n in sorted(by.items()):
        names = out.setdefault(PROTO_NAMES.get(proto, str(proto)), {})
        name = STATE_NAMES.get(state, str(state))
        names[name] = names.get(name, 0) + n
    out["listeners"] = out["tcp"].get("LISTEN", 0)
    return out


def window(rows: list[SockRow], sort: str, reverse: bool, offset: int, limit: int) -> list[SockRow]:
    """rows[offset:offset+limit] in sort order, `rows` being in the table's order
    (sort_key): reversed, the column runs backwards and ties keep the table's order. A
    partial sort when the window is near the top (what a screen shows), a full one
    otherwise; the table's own order is a slice."""
    key = SORT_KEYS[sort]
    want = offset + limit
    if key is None:
        return (rows[::-1] if reverse else rows)[offset:want]
    if want * 8 < len(rows):  # heapq's n-smallest and n-largest are stable, as sorted() is
        top = heapq.nlargest(want, rows, key=key) if reverse else heapq.nsmallest(want, rows, key=key)
        return top[offset:want]
    return sorted(rows, key=key, reverse=reverse)[offset:want]


def processes(rows: Iterable[SockRow]) -> list[dict]:
    """What each process holds, most sockets first."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.get((r.pid, r.comm))
        if g is None:
            g = groups[(r.pid, r.comm)] = {"pid": r.pid, "comm": r.comm, "listeners": 0, "connections": 0,
                                           "udp": 0, "time_wait": 0, "total": 0, "ports": set(),
                                           "row": r}  # fmt: skip
        g["total"] += 1
        if r.protocol == IPPROTO_UDP:
            g["udp"] += 1
            g["ports"].add(r.local_port)
        elif r.state == TcpState.LISTEN:
            g["listeners"] += 1
            g["ports"].add(r.local_port)
        elif r.state == TcpState.TIME_WAIT:
            g["time_wait"] += 1
        else:
            g["connections"] += 1
    out = sorted(groups.values(), key=lambda g: (-g["total"], g["pid"] is None, g["pid"] or 0))  # unowned last
    for g in out:
        g["ports"] = sorted(g["ports"])[:8]
    return out


def with_container(group: dict) -> dict:
    """A process group as the wire carries it: its container (from one of its rows, so
    the owner check the view ran on that row counts) in place of the row."""
    r = group.pop("row")
    group["container"] = r.container.as_dict() if r.container is not None else None
    return group


def view(
    rows: list[SockRow],
    filters: Filters,
    name: str,
    sort: str,
    reverse: bool,
    offset: int,
    limit: int,
    fix_owners: Callable[[list[SockRow]], object] = lambda rows: None,
    whole: Mapping[tuple[int, int], int] | None = None,
) -> dict:
    """The answer to one `view` request (`rows`: the table in sort_key order, as the
    tracker's snapshot keeps it): counts over the whole table, and the window
    (whose owners `fix_owners` checks before they are shown). `whole`: the table's
    sockets by (protocol, state) when already counted (the tracker's tally)."""
    matched = rows if filters.empty else [r for r in rows if filters.match(r)]
    answer: dict[str, Any] = {"counts": counts(rows) if whole is None else counts_of(whole), "matched": len(matched)}
    if name == "processes":
        groups = processes(matched)
        answer["groups"] = len(groups)
        page = groups[offset : offset + limit]
        fix_owners([g["row"] for g in page])
        answer["processes"] = [with_container(g) for g in page]
        return answer
    selected = select(matched, name)
    answer["selected"] = len(selected)
    shown = window(selected, sort, reverse, offset, limit)
    fix_owners(shown)
    answer["rows"] = [r.as_dict() | {"born_ns": r.born_ns} for r in shown]
    return answer
