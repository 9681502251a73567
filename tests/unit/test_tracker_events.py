"""How hook events and kernel reads change the table: the rules the BPF side leaves to
the tracker, driven with plain Event and DiagSock values (no root, no kernel)."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from sockwatch import events as E
from sockwatch.events import Event
from sockwatch.kernel import procscan
from sockwatch.kernel.sockdiag import DiagSock
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, OWNER_HOOK, OWNER_LISTENER, R_ACTIVE, TcpState
from sockwatch.table import Tracker
from sockwatch.table.rules import NEED_INODE, NEED_TUPLE, R_NO_CALLBACKS

NS_COOKIE, NS_INODE = 4096, 4026532000


class Ns:
    inode = NS_INODE
    cookie = NS_COOKIE


class OneNamespace:
    """The registry's interface for a host with one namespace."""

    def __init__(self) -> None:
        self.by_cookie: dict = {}

    def resolve_cookie(self, cookie: int, pid: int | None = None):
        return Ns if cookie == NS_COOKIE else None


def ev(kind, cookie, proto=IPPROTO_TCP, state=7, local=("0.0.0.0", 0), remote=None, owner=None, flags=0, old=0):
    la = ipaddress.ip_address(local[0])
    ra = ipaddress.ip_address(remote[0]) if remote else None
    return Event(
        cookie=cookie,
        netns_cookie=NS_COOKIE,
        ts_ns=0,
        local_addr=la.packed.ljust(16, b"\0"),
        remote_addr=ra.packed.ljust(16, b"\0") if ra else bytes(16),
        pid=owner[0] if owner else 0,
        uid=0,
        local_port=local[1],
        remote_port=remote[1] if remote else 0,
        family=socket.AF_INET6 if la.version == 6 else socket.AF_INET,
        protocol=proto,
        kind=kind,
        state=state,
        old_state=old,
        flags=flags | (E.F_OWNER if owner else 0),
        bind_opts=0,
        err=0,
        comm=(owner[1].encode() if owner else b"").ljust(16, b"\0"),
    )


def tracker() -> Tracker:
    return Tracker(registry=OneNamespace())  # type: ignore[arg-type]


def test_bind_then_release_of_udp():
    t = tracker()
    assert t.apply(ev(E.BIND, 1, IPPROTO_UDP, local=("0.0.0.0", 53), owner=(10, "dnsd")))
    (r,) = t.snapshot()
    assert (r.proto_name, r.state_name, r.local_port, r.pid, r.comm, r.owner_source, r.netns) == (
        "udp",
        "UNCONN",
        53,
        10,
        "dnsd",
        OWNER_HOOK,
        NS_INODE,
    )
    assert t.pending[1] == {NEED_INODE}
    assert t.apply(ev(E.RELEASE, 1, IPPROTO_UDP)) == ("remove", 1)
    assert t.snapshot() == [] and 1 not in t.pending


def diag(cookie, state, local, remote, inode=0, expires_ms=0):
    la, ra = ipaddress.ip_address(local[0]), ipaddress.ip_address(remote[0])
    return DiagSock(IPPROTO_TCP, la.version, state, la, local[1], ra, remote[1], cookie, 0, inode, expires_ms,
                    timewait=state == TcpState.TIME_WAIT)  # fmt: skip


ME = os.getpid()  # a process that surely runs, so that its name can be read
MY_NAME = procscan.process_name(ME)


def test_connection_records_are_the_streams_not_the_tables():
    t = tracker()
    t.apply(ev(E.LISTEN, 1, state=TcpState.LISTEN, local=("0.0.0.0", 80), owner=(5, "web")))
    before = t.version
    for e in (
        ev(E.CONNECT, 2, state=2, local=("10.0.0.1", 4000), remote=("10.0.0.2", 80), owner=(1, "c")),
        ev(E.ACCEPT, 3, state=1, local=("10.0.0.1", 80), remote=("10.0.0.2", 5000)),
        ev(E.STATE, 3, state=TcpState.CLOSE_WAIT, old=TcpState.ESTABLISHED),
        ev(E.RELEASE, 3, state=TcpState.CLOSE_WAIT, old=TcpState.CLOSE_WAIT, flags=E.F_PRESTART),
    ):
        assert t.apply(e) is None
    assert [r.cookie for r in t.snapshot()] == [1] and t.version == before
    # a listener's end is the table's
    assert t.apply(ev(E.STATE, 1, state=TcpState.CLOSE, old=TcpState.LISTEN)) == ("remove", 1)


# (rows before, what the kernel has now) -> the rows after, as (cookie, state, pid, comm, source);
# cookie 10 was connect()ed by this test's process (the hooks' owner log says so)
LISTENER = ev(E.LISTEN, 1, state=TcpState.LISTEN, local=("0.0.0.0", 80), owner=(5, "web"))
OWNERS = {10: ME}
SYNC_CASES = {
    "connect()ed: the owner the hook logged": (
        [],
        [diag(10, TcpState.ESTABLISHED, ("10.0.0.1", 4000), ("10.0.0.2", 443), 77)],
        [(1, TcpState.LISTEN, 5, "web", OWNER_HOOK), (10, TcpState.ESTABLISHED, ME, MY_NAME, OWNER_HOOK)],
    ),
    "accepted: its listener's owner": (
        [],
        [diag(11, TcpState.ESTABLISHED, ("10.0.0.1", 80), ("10.0.0.2", 5000), 78)],
        [(1, TcpState.LISTEN, 5, "web", OWNER_HOOK), (11, TcpState.ESTABLISHED, 5, "web", OWNER_LISTENER)],
    ),
    "no storage and no listener: no owner until /proc is asked": (
        [],
        [diag(12, TcpState.ESTABLISHED, ("10.0.0.1", 81), ("10.0.0.2", 5000), 79)],
        [(1, TcpState.LISTEN, 5, "web", OWNER_HOOK), (12, TcpState.ESTABLISHED, None, None, None)],
    ),
    "closed from FIN-WAIT-2: TIME-WAIT, no file and so no owner": (
        [diag(10, TcpState.ESTABLISHED, ("10.0.0.1", 4000), ("10.0.0.2", 443), 77)],
        [diag(10, TcpState.TIME_WAIT, ("10.0.0.1", 4000), ("10.0.0.2", 443), 0, expires_ms=59000)],
        [(1, TcpState.LISTEN, 5, "web", OWNER_HOOK), (10, TcpState.TIME_WAIT, None, None, None)],
    ),
    "gone from the kernel: gone from the table, the listener kept": (
        [diag(10, TcpState.ESTABLISHED, ("10.0.0.1", 4000), ("10.0.0.2", 443), 77)],
        [],
        [(1, TcpState.LISTEN, 5, "web", OWNER_HOOK)],
    ),
}


@pytest.mark.parametrize("case", SYNC_CASES, ids=list(SYNC_CASES))
def test_connections_become_the_kernels(case):
    before, now, want = SYNC_CASES[case]
    t = tracker()
    t.apply(LISTENER)
    t.apply_connections([(d, Ns) for d in before], 1000, OWNERS)
    t.apply_connections([(d, Ns) for d in now], 2000, OWNERS)
    got = sorted((r.cookie, r.state, r.pid, r.comm, r.owner_source) for r in t.rows.values())
    assert got == want
    for r in t.rows.values():
        if r.cookie != 1:  # the connections' age starts when a read first saw them
            assert r.born_ns == (1000 if before else 2000)
            assert bool(r.flags & R_ACTIVE) == (r.cookie == 10)  # opened by connect()


def test_an_unchanged_read_changes_nothing_and_time_wait_ends_are_counted():
    t = tracker()
    d = diag(10, TcpState.ESTABLISHED, ("10.0.0.1", 4000), ("10.0.0.2", 443), 77)
    assert t.apply_connections([(d, Ns)], 1, OWNERS) == 1
    v = t.version
    assert t.apply_connections([(d, Ns)], 2, OWNERS) == 0 and t.version == v
    tw = diag(10, TcpState.TIME_WAIT, ("10.0.0.1", 4000), ("10.0.0.2", 443), 0, expires_ms=59000)
    t.apply_connections([(tw, Ns)], 3, OWNERS)
    t.apply_connections([], 4, OWNERS)
    assert t.rows == {} and t.stats.expired == 1


def test_connections_are_read_again_only_when_the_hooks_counted_a_change_or_a_time_wait_is_due():
    t = tracker()
    assert t.connections_stale(None)  # never read, or the count is not known
    t._synced_generation = 7
    tw = diag(10, TcpState.TIME_WAIT, ("10.0.0.1", 4000), ("10.0.0.2", 443), 0, expires_ms=30_000)
    t.apply_connections([(tw, Ns)], 1, {})
    now = t._timewait_next - 30
    assert not t.connections_stale(7, now)
    assert t.connections_stale(8, now)
    assert t.connections_stale(7, now + 30.01)  # the kernel let the TIME-WAIT go by now


def test_a_listener_from_before_start_leaves_when_released():
    t = tracker()
    t.apply(ev(E.LISTEN, 7, state=TcpState.LISTEN, local=("10.0.0.1", 4002)))
    t.rows[7].flags |= R_NO_CALLBACKS  # as bootstrap marks sockets from before start
    assert t.apply(ev(E.RELEASE, 7, state=TcpState.LISTEN, old=TcpState.LISTEN, flags=E.F_PRESTART)) == ("remove", 7)
    assert 7 not in t.pending


def test_udp_connect_waits_for_the_kernels_choice_of_local_side():
    t = tracker()
    t.apply(ev(E.BIND, 8, IPPROTO_UDP, local=("0.0.0.0", 5000), owner=(3, "dig")))
    t.apply(ev(E.UDP_CONNECT, 8, IPPROTO_UDP, state=1, remote=("10.0.0.53", 53), owner=(3, "dig")))
    assert NEED_TUPLE in t.pending[8]
    r = t.rows[8]
    assert (r.state, r.local_port, r.remote_port) == (TcpState.ESTABLISHED, 5000, 53)


def test_events_from_an_unknown_namespace_are_counted_not_guessed():
    t = tracker()
    t.apply(ev(E.BIND, 9, IPPROTO_UDP, local=("0.0.0.0", 1))._replace(netns_cookie=1))
    assert t.rows == {} and t.stats.unknown_netns == 1


def test_binds_count_by_the_port_asked_and_cap_their_keys(monkeypatch):
    import sockwatch.table.hook_events as tr

    monkeypatch.setattr(tr, "MAX_BIND_KEYS", 3)
    t = tracker()
    t.apply(ev(E.BIND, 1, IPPROTO_UDP, local=("0.0.0.0", 53), flags=E.F_PORT_ASKED))
    t.apply(ev(E.BIND, 2, IPPROTO_UDP, local=("0.0.0.0", 40001)))  # bind(port 0): the kernel chose 40001
    t.apply(ev(E.BIND, 3, IPPROTO_TCP, local=("0.0.0.0", 80), flags=E.F_PORT_ASKED))
    t.apply(ev(E.BIND, 4, IPPROTO_TCP, local=("0.0.0.0", 81), flags=E.F_PORT_ASKED))  # a fourth key: "other"
    t.apply(ev(E.BIND, 5, IPPROTO_UDP, local=("0.0.0.0", 53), flags=E.F_PORT_ASKED))  # a known key still counts
    assert dict(t.stats.binds) == {(IPPROTO_UDP, 53): 2, (IPPROTO_UDP, 0): 1, (IPPROTO_TCP, 80): 1,
                                   (IPPROTO_TCP, -1): 1}  # fmt: skip


@pytest.mark.parametrize(
    ("bound_by", "then", "owner_after"),
    [
        ((10, "web"), E.LISTEN, (10, "web")),  # sockops without owners (before 6.2): the binder's
        (None, E.LISTEN, (None, None)),  # listen() without bind(): no hook saw the task
        ((10, "web"), None, None),  # bound, then released: nothing kept
    ],
)
def test_a_tcp_listen_without_an_owner_takes_its_binders(bound_by, then, owner_after):
    t = tracker()
    t.owners_from_binds = True  # the agent's, where sockops cannot read the task
    if bound_by:
        assert t.apply(ev(E.BIND, 1, local=("127.0.0.1", 8080), owner=bound_by)) is None  # not tabled
    if then is None:
        t.apply(ev(E.RELEASE, 1))
        assert not t._bound_owner
        return
    t.apply(ev(then, 1, state=TcpState.LISTEN, local=("127.0.0.1", 8080)))
    (r,) = t.snapshot()
    assert (r.pid, r.comm) == owner_after and not t._bound_owner
    if owner_after[0] is not None:
        assert r.owner_source == OWNER_HOOK
        # an accepted connection then inherits it from its listener, as with owners
        t.apply_connections([(diag(2, TcpState.ESTABLISHED, ("127.0.0.1", 8080), ("127.0.0.1", 5555)), Ns)], 1, {})
        assert t.rows[2].pid == 10 and t.rows[2].owner_source == OWNER_LISTENER


def test_a_listen_with_its_own_owner_keeps_it():
    t = tracker()
    t.owners_from_binds = True
    t.apply(ev(E.BIND, 1, local=("127.0.0.1", 8080), owner=(10, "web")))
    t.apply(ev(E.LISTEN, 1, state=TcpState.LISTEN, local=("127.0.0.1", 8080), owner=(11, "forked")))
    assert (t.rows[1].pid, t.rows[1].comm) == (11, "forked") and not t._bound_owner


def test_where_sockops_names_owners_binds_are_not_remembered():
    t = tracker()  # owners_from_binds off: listen and connect carry their own owner
    t.apply(ev(E.BIND, 1, local=("127.0.0.1", 8080), owner=(10, "web")))
    assert not t._bound_owner


def test_the_owner_rule_sees_renames_and_exits_with_the_table_unchanged():
    """A whole-table owner pass with no row changed since reads each owner once, not each
    row; a rename or an exit in between must still show at the next pass."""
    import subprocess
    import sys

    rename = (
        "import ctypes, sys; sys.stdin.readline(); ctypes.CDLL(None).prctl(15, b'sw-renamed', 0, 0, 0);"
        " print('renamed', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", rename], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        t = tracker()
        for c in (1, 2):
            t.apply(ev(E.BIND, c, IPPROTO_UDP, local=("0.0.0.0", 5000 + c), owner=(child.pid, "spawned")))
        t.fix_owners()
        assert {r.comm for r in t.rows.values()} == {procscan.process_name(child.pid)}
        v = t.version
        assert t.fix_owners() == 0 and t.version == v  # nothing changed: nothing to do
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("rename\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "renamed"
        assert t.fix_owners() == 2
        assert {r.comm for r in t.rows.values()} == {"sw-renamed"}
        assert t.fix_owners() == 0
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(10)
    t.fix_owners()  # the owner exited (the rows' sockets would be someone else's, or gone)
    assert {(r.pid, r.comm) for r in t.rows.values()} == {(None, None)}


@pytest.mark.parametrize(("owner", "flags", "want"), [
    ((9, "web"), 0, (9, 0, "web")),
    ((9, "web"), E.F_LIFETIME, None),  # a lifetime record carries counts where an owner would be
    (None, 0, None),
], ids=["owner", "lifetime record", "no owner"])  # fmt: skip
def test_the_table_and_the_stream_decode_a_record_alike(owner, flags, want):
    from sockwatch.stream import sock_of_event
    from sockwatch.table.rules import row_from_event

    e = ev(E.STATE, 5, local=("10.0.0.1", 80), remote=("10.0.0.2", 5000), owner=owner, flags=flags)
    assert E.decode(e).owner == want
    row, sock = row_from_event(e, NS_INODE), sock_of_event(e, NS_INODE)
    assert (row.pid, row.uid, row.comm) == (sock.pid, sock.uid, sock.comm) == (want or (None, None, None))
    assert (str(row.local_address), str(row.remote_address)) == (sock.local, sock.remote) == ("10.0.0.1", "10.0.0.2")
