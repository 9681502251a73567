"""How hook events change the table: the rules the BPF side cannot apply itself."""

from __future__ import annotations

import ctypes
import ipaddress
import socket

from sockwatch.kernel import abi
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, OWNER_HOOK, OWNER_LISTENER, TcpState
from sockwatch.tracker import NEED_INODE, NEED_ORPHAN, NEED_TIMEWAIT, NEED_TUPLE, Tracker

NS_COOKIE, NS_INODE = 4096, 4026532000


class Ns:
    inode = NS_INODE


class OneNamespace:
    """The registry's interface for a host with one namespace."""

    def __init__(self) -> None:
        self.by_inode: dict = {}

    def resolve_cookie(self, cookie: int, pid: int | None = None):
        return Ns if cookie == NS_COOKIE else None


def ev(kind, cookie, proto=IPPROTO_TCP, state=7, local=("0.0.0.0", 0), remote=None, owner=None, flags=0, old=0):
    e = abi.SwEvent()
    s = e.sock
    la = ipaddress.ip_address(local[0])
    s.cookie, s.netns_cookie, s.protocol = cookie, NS_COOKIE, proto
    s.family = socket.AF_INET6 if la.version == 6 else socket.AF_INET
    s.state, s.flags = state, flags
    ctypes.memmove(s.local_addr, la.packed, len(la.packed))
    s.local_port = local[1]
    if remote:
        ra = ipaddress.ip_address(remote[0])
        ctypes.memmove(s.remote_addr, ra.packed, len(ra.packed))
        s.remote_port = remote[1]
    if owner:
        s.pid, s.uid, s.comm = owner[0], 0, owner[1].encode()
        s.flags |= abi.SW_F_OWNER
    e.kind, e.old_state = kind, old
    return e


def tracker() -> Tracker:
    return Tracker(registry=OneNamespace())  # type: ignore[arg-type]


def test_bind_then_release_of_udp():
    t = tracker()
    t.apply(ev(abi.SW_EV_BIND, 1, IPPROTO_UDP, local=("0.0.0.0", 53), owner=(10, "dnsd")))
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
    t.apply(ev(abi.SW_EV_RELEASE, 1, IPPROTO_UDP, local=("0.0.0.0", 53), flags=abi.SW_F_RELEASED))
    assert t.snapshot() == [] and 1 not in t.pending


def test_bound_tcp_is_hidden_until_it_listens():
    t = tracker()
    t.apply(ev(abi.SW_EV_BIND, 2, local=("127.0.0.1", 8080), owner=(11, "web")))
    assert t.snapshot() == []
    t.apply(ev(abi.SW_EV_LISTEN, 2, state=TcpState.LISTEN, local=("127.0.0.1", 8080), owner=(11, "web")))
    assert [r.state_name for r in t.snapshot()] == ["LISTEN"]


def test_accepted_connection_takes_its_listeners_owner():
    t = tracker()
    t.apply(ev(abi.SW_EV_LISTEN, 1, state=TcpState.LISTEN, local=("::", 443), owner=(20, "proxy")))
    t.apply(ev(abi.SW_EV_LISTEN, 2, state=TcpState.LISTEN, local=("10.0.0.1", 443), owner=(21, "other")))
    # dual-stack listener taking IPv4: the child is IPv6 with a v4-mapped address
    t.apply(ev(abi.SW_EV_ACCEPT, 3, state=1, local=("::ffff:127.0.0.1", 443), remote=("::ffff:127.0.0.1", 5000)))
    t.apply(ev(abi.SW_EV_ACCEPT, 4, state=1, local=("10.0.0.1", 443), remote=("10.0.0.9", 5001)))
    rows = {r.cookie: r for r in t.snapshot()}
    assert (rows[3].pid, rows[3].owner_source) == (20, OWNER_LISTENER)
    assert rows[4].pid == 21  # the exact address wins over the wildcard


def test_close_after_fin_wait2_is_time_wait_until_the_kernel_confirms():
    t = tracker()
    t.apply(ev(abi.SW_EV_CONNECT, 5, state=2, local=("10.0.0.1", 4000), remote=("10.0.0.2", 80), owner=(1, "c")))
    t.rows[5].inode = 99
    t.apply(
        ev(
            abi.SW_EV_STATE,
            5,
            state=TcpState.CLOSE,
            local=("10.0.0.1", 4000),
            remote=("10.0.0.2", 80),
            old=TcpState.FIN_WAIT2,
            flags=abi.SW_F_RELEASED | abi.SW_F_STATECB,
        )
    )
    (r,) = t.snapshot()
    assert (r.state_name, r.inode) == ("TIME-WAIT", 0)
    assert t.pending[5] == {NEED_TIMEWAIT}


def test_reset_connection_leaves_at_once():
    t = tracker()
    t.apply(ev(abi.SW_EV_ESTABLISHED, 6, state=1, local=("10.0.0.1", 4001), remote=("10.0.0.2", 80), owner=(1, "c")))
    t.apply(ev(abi.SW_EV_STATE, 6, state=TcpState.CLOSE, old=TcpState.ESTABLISHED, flags=abi.SW_F_RELEASED))
    assert t.snapshot() == []


def test_released_connection_without_state_callbacks_is_checked_with_the_kernel():
    t = tracker()
    t.apply(ev(abi.SW_EV_BIND, 7, local=("10.0.0.1", 4002), owner=(1, "c")))
    t.rows[7].state, t.rows[7].remote_address, t.rows[7].remote_port = 1, ipaddress.ip_address("10.0.0.2"), 80
    t.apply(ev(abi.SW_EV_RELEASE, 7, flags=abi.SW_F_RELEASED, old=TcpState.ESTABLISHED))
    assert NEED_ORPHAN in t.pending[7]
    assert t.snapshot()  # an orphan still holds its 4-tuple


def test_udp_connect_waits_for_the_kernels_choice_of_local_side():
    t = tracker()
    t.apply(ev(abi.SW_EV_UDP_CONNECT, 8, IPPROTO_UDP, state=1, owner=(3, "dig")))
    assert NEED_TUPLE in t.pending[8]
    assert t.rows[8].state == TcpState.ESTABLISHED


def test_events_from_an_unknown_namespace_are_counted_not_guessed():
    t = tracker()
    e = ev(abi.SW_EV_BIND, 9, IPPROTO_UDP, local=("0.0.0.0", 1))
    e.sock.netns_cookie = 1
    t.apply(e)
    assert t.rows == {} and t.stats.unknown_netns == 1
