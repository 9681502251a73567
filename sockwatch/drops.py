"""Packets that reached a socket and were dropped there, per socket and kernel drop
reason (pure; no I/O, no root).

Two kernel sources, joined when a view asks:

- each socket's `sk_drops`, read by sock_diag with the socket (what `ss -m` prints as
  `d`): every packet the socket dropped, whatever the reason, since it was made;
- the drop hook's counts per socket and reason (bpf/drops.bpf.c), for the drops the
  kernel frees naming the socket (skb:kfree_skb's rx_sk, 6.11 on).

One drop the kernel frees with no reason: a SYN to a listener whose accept queue is full
is consumed (tcp_conn_request -> tcp_listendrop), counted only in the listener's
sk_drops and in its namespace's TcpExtListenOverflows and TcpExtListenDrops. A
listener's drops the hook did not see are attributed from its namespace's counters,
never guessed:

- all to TCP_LISTEN_OVERFLOW when every listen drop the namespace ever counted was an
  overflow (ListenDrops = ListenOverflows: the usual case, with syncookies on), or when
  every one since the last read was;
- else, when one listener alone grew since the last read, as many as the namespace's
  overflows the hook did not see, and the rest NOT_SPECIFIED;
- else NOT_SPECIFIED (the kernel's own name for a drop without a reason).

A UDP socket's (or a connection's) drops the hook did not see are NOT_SPECIFIED. Drops
from before sockwatch watched a socket are `earlier`, apart from the reasons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sockwatch.filters import Filters
from sockwatch.model import IPPROTO_TCP, SockRow, TcpState, fmt_addr, is_container
from sockwatch.schema import FAMILY_NAMES

LISTEN_OVERFLOW = "TCP_LISTEN_OVERFLOW"
NOT_SPECIFIED = "NOT_SPECIFIED"


@dataclass(frozen=True)
class Seen:
    """A socket as read now."""

    cookie: int
    netns: int  # its namespace's inode
    listener: bool  # a TCP listener (else a UDP socket)
    drops: int  # sk_drops, now
    new: bool  # made since sockwatch watched: every drop it counted is since then


@dataclass(frozen=True)
class Netstat:
    """A namespace's listen drop counters (/proc/net/netstat's TcpExt), now."""

    overflows: int  # ListenOverflows
    drops: int  # ListenDrops: overflows and every other listen drop


@dataclass
class Drops:
    """One socket's drops: `total` as the kernel counts it (sk_drops; None for a
    connection, whose total is not read), `earlier` from before sockwatch watched it,
    and the rest by reason."""

    total: int | None
    earlier: int
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Book:
    base: int  # sk_drops at first sight, less what the hook saw of them
    untagged: int = 0  # drops since then the hook did not see, attributed so far
    attributed: dict[str, int] = field(default_factory=dict)


class Ledger:
    """What each socket's drops were attributed to, kept between reads (a drop is
    attributed once, when it is first seen)."""

    def __init__(self) -> None:
        self._books: dict[int, _Book] = {}
        self._netstat: dict[int, Netstat] = {}  # a namespace's counters at the last read that needed them
        self._hook_overflows: dict[int, int] = {}  # a namespace's TCP_LISTEN_OVERFLOW the hook saw, then

    def update(
        self,
        socks: Iterable[Seen],
        hooked: dict[int, dict[str, int]],
        netstat: Callable[[int], Netstat | None],
        connections: Iterable[int] = (),
    ) -> dict[int, Drops]:
        """Each socket's drops now. `hooked`: the hook's counts (cookie -> reason -> n;
        empty without the hook); `netstat`: a namespace's counters, read only for a
        namespace where a listener dropped what the hook did not see (None: unreadable);
        `connections`: cookies of the table's other sockets, whose drops are the hook's
        alone. Sockets not given are forgotten."""
        socks = list(socks)
        out: dict[int, Drops] = {}
        grew: dict[int, list[tuple[Seen, _Book, int]]] = {}  # netns -> listeners whose untagged grew
        hook_overflows: dict[int, int] = {}
        for s in socks:
            seen = hooked.get(s.cookie, {})
            tagged = sum(seen.values())
            book = self._books.get(s.cookie)
            if book is None:
                book = self._books[s.cookie] = _Book(0 if s.new else max(0, s.drops - tagged))
            untagged = max(0, s.drops - book.base - tagged)
            if s.listener:
                hook_overflows[s.netns] = hook_overflows.get(s.netns, 0) + seen.get(LISTEN_OVERFLOW, 0)
            if untagged > book.untagged:
                if s.listener:
                    grew.setdefault(s.netns, []).append((s, book, untagged - book.untagged))
                else:
                    _add(book.attributed, NOT_SPECIFIED, untagged - book.untagged)
                book.untagged = untagged
            out[s.cookie] = Drops(s.drops, book.base, _merged(seen, book.attributed))
        for netns, listeners in grew.items():
            self._attribute(netns, listeners, netstat(netns), hook_overflows.get(netns, 0))
            for s, book, _n in listeners:
                out[s.cookie].reasons = _merged(hooked.get(s.cookie, {}), book.attributed)
        for cookie in connections:
            if cookie in hooked and cookie not in out:
                out[cookie] = Drops(None, 0, dict(hooked[cookie]))
        kept = {s.cookie for s in socks}
        for cookie in [c for c in self._books if c not in kept]:
            del self._books[cookie]
        return out

    def _attribute(self, netns: int, listeners: list[tuple[Seen, _Book, int]], now: Netstat | None,
                   hook_overflows: int) -> None:  # fmt: skip
        """Attribute the growth of `listeners` (one namespace's) from its counters."""
        before, hooked_before = self._netstat.get(netns), self._hook_overflows.get(netns)
        if now is not None:
            self._netstat[netns], self._hook_overflows[netns] = now, hook_overflows
        if now is not None and (now.drops == now.overflows or (
                before is not None and now.drops - before.drops == now.overflows - before.overflows)):  # fmt: skip
            for _s, book, n in listeners:
                _add(book.attributed, LISTEN_OVERFLOW, n)
            return
        if now is not None and before is not None and hooked_before is not None and len(listeners) == 1:
            _s, book, n = listeners[0]
            unseen = max(0, (now.overflows - before.overflows) - (hook_overflows - hooked_before))
            _add(book.attributed, LISTEN_OVERFLOW, min(n, unseen))
            _add(book.attributed, NOT_SPECIFIED, n - min(n, unseen))
            return
        for _s, book, n in listeners:
            _add(book.attributed, NOT_SPECIFIED, n)


def _add(into: dict[str, int], reason: str, n: int) -> None:
    if n > 0:
        into[reason] = into.get(reason, 0) + n


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        _add(out, k, v)
    return out


def parse_netstat(text: str) -> Netstat | None:
    """ListenOverflows and ListenDrops from /proc/net/netstat (pairs of lines: names,
    then values, each prefixed `TcpExt:`); None if absent."""
    lines = text.splitlines()
    for names, values in zip(lines[0::2], lines[1::2], strict=False):
        if not names.startswith("TcpExt:") or not values.startswith("TcpExt:"):
            continue
        got = dict(zip(names.split()[1:], values.split()[1:], strict=False))
        try:
            return Netstat(int(got["ListenOverflows"]), int(got["ListenDrops"]))
        except (KeyError, ValueError):
            return None
    return None


def report(found: Iterable[tuple[SockRow, Drops]], f: Filters) -> list[dict[str, Any]]:
    """The sockets that dropped packets, most first, as the drops view shows them: each
    with its owner, its drops by reason, and its receive queue against its limit (a
    listener's accept queue and backlog; a UDP socket's receive memory and SO_RCVBUF)."""
    out: list[dict[str, Any]] = []
    for r, d in found:
        if not f.empty and not f.match(r):
            continue
        listener = r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN
        out.append({
            "netns": r.netns,
            "protocol": r.proto_name,
            "family": FAMILY_NAMES[r.family],
            "state": r.state_name,
            "local_address": fmt_addr(r.local_address),
            "local_port": r.local_port,
            "remote_address": fmt_addr(r.remote_address) if r.is_connection and r.remote_address else None,
            "remote_port": r.remote_port if r.is_connection else None,
            "cookie": r.cookie,
            "pid": r.pid,
            "comm": r.comm,
            "container": r.container.as_dict() if r.container is not None and is_container(r.container) else None,
            "drops": d.total if d.total is not None else sum(d.reasons.values()),
            "earlier": d.earlier,
            "reasons": dict(sorted(d.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "queue": _queue(r, listener),
        })  # fmt: skip
    out.sort(key=lambda x: (-int(x["drops"]), x["netns"], x["protocol"], x["local_port"], x["cookie"]))
    return out


def _queue(r: SockRow, listener: bool) -> dict[str, Any] | None:
    """What fills before a drop: a listener's accept queue and its backlog, or a UDP
    socket's receive memory and its buffer; None for a connection."""
    if listener:
        return {"kind": "accept", "used": r.recv_q, "limit": r.send_q}
    if r.is_connection or r.rmem is None:
        return None
    return {"kind": "receive", "used": r.rmem, "limit": r.rcvbuf, "bytes_queued": r.recv_q}
