"""The table's rules, pure: which rows and records are about connections (read from
the kernel, not kept from events), how a kernel read or a hook's record becomes a row,
and the flags and reasons the table keeps per row. Table-tested in tests/unit."""

from __future__ import annotations

from typing import NamedTuple

from sockwatch import events as ev
from sockwatch.events import Event
from sockwatch.kernel import sockdiag
from sockwatch.kernel.netns import Namespace
from sockwatch.model import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    OWNER_HOOK,
    R_ACTIVE,
    SockRow,
    TcpState,
)

# Why a row waits for a sock_diag read (done when a view asks, or at reconcile).

NEED_INODE = "inode"  # not read yet

NEED_TUPLE = "tuple"  # connected UDP: the kernel chose the local side

NEED_ORPHAN = "orphan"  # a released listener without state callbacks (from before start)

# SockRow.flags, the tracker's own bookkeeping

R_RELEASED = 0x01  # no file holds it (a TCP orphan lives on until CLOSE)

R_NO_CALLBACKS = 0x02  # from before sockwatch: no state callbacks will tell its end


class Change(NamedTuple):
    """What one applied event did to the table: 'add', 'update' or 'remove'."""

    op: str
    cookie: int


def is_connection_row(r: SockRow) -> bool:
    """A row sync_connections keeps (every TCP state but LISTEN)."""
    return r.protocol == IPPROTO_TCP and r.state != TcpState.LISTEN


def is_connection_event(e: Event, old: SockRow | None) -> bool:
    """A record about a TCP connection: the stream's alone (the table reads connections
    from the kernel). Listens and a listener's end stay the table's."""
    if e.protocol != IPPROTO_TCP or e.kind in (ev.LISTEN, ev.BIND, ev.BIND_FAIL):
        return False
    if e.kind == ev.STATE:
        return e.old_state != TcpState.LISTEN
    if e.kind == ev.RELEASE:
        return old is None or old.state != TcpState.LISTEN
    return True  # connect, accept


def row_from_diag(d: sockdiag.DiagSock, ns: Namespace, unnamed: set[int] | None = None) -> SockRow:
    """A row as the kernel has the socket; `unnamed` collects it if it is bound to a device."""
    if d.bound_dev and unnamed is not None:
        unnamed.add(d.cookie)
    connected = d.remote_port != 0
    keyed_by_ip_port = d.protocol == IPPROTO_UDP or d.state == TcpState.LISTEN  # (queues: see SockRow)
    return SockRow(
        cookie=d.cookie,
        protocol=d.protocol,
        family=d.family,
        state=d.state,
        local_address=d.local_address,
        local_port=d.local_port,
        remote_address=d.remote_address if connected else None,
        remote_port=d.remote_port,
        netns=ns.inode,
        inode=d.inode,
        uid=d.uid,
        netns_cookie=ns.cookie,
        bound_dev=d.bound_dev,
        recv_q=d.rqueue if keyed_by_ip_port else None,
        send_q=d.wqueue if keyed_by_ip_port else None,
    )


def row_from_event(e: Event, netns: int) -> SockRow:
    d = ev.decode(e)
    pid, uid, comm = d.owner or (None, None, None)
    return SockRow(
        cookie=e.cookie,
        protocol=e.protocol,
        family=d.family,
        state=e.state,
        local_address=d.local,
        local_port=e.local_port,
        remote_address=d.remote,
        remote_port=e.remote_port,
        netns=netns,
        pid=pid,
        uid=uid,
        comm=comm,
        owner_source=OWNER_HOOK if d.owner else None,
        netns_cookie=e.netns_cookie,
        flags=R_ACTIVE if e.kind == ev.CONNECT else 0,
        born_ns=e.ts_ns,
    )
