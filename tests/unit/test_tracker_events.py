"""How hook events change the table: the rules the BPF side leaves to the tracker,
driven with plain Event values (no root, no kernel)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from sockwatch import events as E
from sockwatch.events import Event
from sockwatch.kernel import abi
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, OWNER_HOOK, OWNER_LISTENER, TcpState
from sockwatch.tracker import NEED_INODE, NEED_ORPHAN, NEED_STATE, NEED_TIMEWAIT, NEED_TUPLE, R_NO_CALLBACKS, Tracker

NS_COOKIE, NS_INODE = 4096, 4026532000


class Ns:
    inode = NS_INODE


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
        pad=0,
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


def test_accepted_connection_takes_its_listeners_owner():
    t = tracker()
    t.apply(ev(E.LISTEN, 1, state=TcpState.LISTEN, local=("::", 443), owner=(20, "proxy")))
    t.apply(ev(E.LISTEN, 2, state=TcpState.LISTEN, local=("10.0.0.1", 443), owner=(21, "other")))
    # dual-stack listener taking IPv4: the child is IPv6 with a v4-mapped address
    t.apply(ev(E.ACCEPT, 3, state=1, local=("::ffff:127.0.0.1", 443), remote=("::ffff:127.0.0.1", 5000)))
    t.apply(ev(E.ACCEPT, 4, state=1, local=("10.0.0.1", 443), remote=("10.0.0.9", 5001)))
    rows = {r.cookie: r for r in t.snapshot()}
    assert (rows[3].pid, rows[3].owner_source) == (20, OWNER_LISTENER)
    assert rows[4].pid == 21  # the exact address wins over the wildcard


def test_active_open_waits_for_a_kernel_read_of_its_state():
    t = tracker()
    t.apply(ev(E.CONNECT, 5, state=2, local=("10.0.0.1", 4000), remote=("10.0.0.2", 80), owner=(1, "c")))
    assert t.rows[5].state_name == "SYN-SENT" and NEED_STATE in t.pending[5]


def test_close_after_fin_wait2_is_time_wait_until_the_kernel_confirms():
    t = tracker()
    t.apply(ev(E.CONNECT, 5, state=2, local=("10.0.0.1", 4000), remote=("10.0.0.2", 80), owner=(1, "c")))
    t.rows[5].inode = 99
    t.apply(ev(E.STATE, 5, state=TcpState.FIN_WAIT1, old=TcpState.ESTABLISHED))
    t.apply(ev(E.STATE, 5, state=TcpState.FIN_WAIT2, old=TcpState.FIN_WAIT1))
    t.apply(ev(E.STATE, 5, state=TcpState.CLOSE, old=TcpState.FIN_WAIT2))
    (r,) = t.snapshot()
    assert (r.state_name, r.inode, r.pid) == ("TIME-WAIT", 0, None)  # no file, so no owner (as ss -p)
    assert t.pending[5] == {NEED_TIMEWAIT}


def test_reset_connection_leaves_at_once():
    t = tracker()
    t.apply(ev(E.ACCEPT, 6, state=1, local=("10.0.0.1", 4001), remote=("10.0.0.2", 80)))
    assert t.apply(ev(E.STATE, 6, state=TcpState.CLOSE, old=TcpState.ESTABLISHED)) == ("remove", 6)
    assert t.snapshot() == []


@pytest.mark.parametrize("through_ring", [False, True], ids=["events", "ring-records"])
def test_a_socket_born_and_gone_within_one_batch_is_never_tabled(through_ring):
    t = tracker()
    t.apply(ev(E.LISTEN, 1, state=TcpState.LISTEN, local=("127.0.0.1", 80), owner=(5, "web")))
    batch = []
    for c in range(100, 200, 2):
        batch += [
            ev(E.CONNECT, c, state=2, local=("127.0.0.1", c), remote=("127.0.0.1", 80), owner=(6, "ab")),
            ev(E.ACCEPT, c + 1, state=1, local=("127.0.0.1", 80), remote=("127.0.0.1", c)),
            ev(E.STATE, c, state=TcpState.CLOSE, old=TcpState.ESTABLISHED),
            ev(E.STATE, c + 1, state=TcpState.CLOSE, old=TcpState.ESTABLISHED),
        ]
    survivor = ev(E.ACCEPT, 999, state=1, local=("127.0.0.1", 80), remote=("127.0.0.1", 999))
    evs = [*batch, survivor]
    changes = t.apply_batch(abi.decode_batch(abi.records(evs))[0] if through_ring else evs)
    assert changes == [("add", 999)]
    assert t.stats.coalesced == len(batch) and t.stats.events.total() == len(batch) + 2
    assert [r.cookie for r in t.snapshot()] == [1, 999]
    # a known socket's end is always applied, even in the batch that would coalesce it
    assert t.apply_batch([ev(E.STATE, 999, state=TcpState.CLOSE, old=TcpState.ESTABLISHED)]) == [("remove", 999)]


def test_released_connection_without_state_callbacks_is_checked_with_the_kernel():
    t = tracker()
    t.apply(ev(E.ACCEPT, 7, state=1, local=("10.0.0.1", 4002), remote=("10.0.0.2", 80)))
    t.rows[7].flags |= R_NO_CALLBACKS  # as bootstrap marks sockets from before start
    t.apply(ev(E.RELEASE, 7, state=1, old=TcpState.ESTABLISHED, flags=E.F_PRESTART))
    assert NEED_ORPHAN in t.pending[7]
    assert t.snapshot()  # an orphan still holds its 4-tuple


def test_a_prestart_release_of_a_socket_a_hook_saw_born_is_not_an_end():
    """The hook's prestart bound is a cookie, and cookies come in per-CPU batches: a
    socket made after start can carry the flag. Its state callbacks tell its end."""
    t = tracker()
    t.apply(ev(E.ACCEPT, 7, state=1, local=("10.0.0.1", 4002), remote=("10.0.0.2", 80)))
    t.apply(ev(E.RELEASE, 7, state=1, old=TcpState.ESTABLISHED, flags=E.F_PRESTART))
    assert NEED_ORPHAN not in t.pending.get(7, set())


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
    import sockwatch.tracker as tr

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
        ((10, "web"), E.CONNECT, (10, "web")),
        (None, E.LISTEN, (None, None)),  # listen() without bind(): no hook saw the task
        ((10, "web"), None, None),  # bound, then released: nothing kept
    ],
)
def test_a_tcp_listen_or_connect_without_an_owner_takes_its_binders(bound_by, then, owner_after):
    t = tracker()
    t.owners_from_binds = True  # the agent's, where sockops cannot read the task
    if bound_by:
        assert t.apply(ev(E.BIND, 1, local=("127.0.0.1", 8080), owner=bound_by)) is None  # not tabled
    if then is None:
        t.apply(ev(E.RELEASE, 1))
        assert not t._bound_owner
        return
    state = TcpState.LISTEN if then == E.LISTEN else TcpState.SYN_SENT
    remote = ("127.0.0.1", 80) if then == E.CONNECT else None
    t.apply(ev(then, 1, state=state, local=("127.0.0.1", 8080), remote=remote))
    (r,) = t.snapshot()
    assert (r.pid, r.comm) == owner_after and not t._bound_owner
    if owner_after[0] is not None:
        assert r.owner_source == OWNER_HOOK
        # an accepted connection then inherits it from its listener, as with owners
        if then == E.LISTEN:
            t.apply(ev(E.ACCEPT, 2, state=TcpState.ESTABLISHED, local=("127.0.0.1", 8080), remote=("127.0.0.1", 5555)))
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
