"""ctypes mirrors of bpf/sockwatch.h and their decoding into model rows.

Sizes are checked against what the compiler produced (bcc's map leaf types) at load:
a header change that Python does not follow fails loudly instead of misreading.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress

from sockwatch.model import FAMILY_VERSION, SockRow, TcpState

SW_COMM_LEN = 16

SW_F_OWNER = 0x01
SW_F_ANNOUNCED = 0x02
SW_F_RELEASED = 0x04
SW_F_PASSIVE = 0x08
SW_F_STATECB = 0x10

SW_EV_BIND = 1
SW_EV_LISTEN = 2
SW_EV_CONNECT = 3
SW_EV_ESTABLISHED = 4
SW_EV_ACCEPT = 5
SW_EV_STATE = 6
SW_EV_UDP_CONNECT = 7
SW_EV_RELEASE = 8
SW_EV_SENDTO = 9
EVENT_NAMES = {
    SW_EV_BIND: "bind",
    SW_EV_LISTEN: "listen",
    SW_EV_CONNECT: "connect",
    SW_EV_ESTABLISHED: "established",
    SW_EV_ACCEPT: "accept",
    SW_EV_STATE: "state",
    SW_EV_UDP_CONNECT: "udp_connect",
    SW_EV_RELEASE: "release",
    SW_EV_SENDTO: "sendto",
}

SW_C_RINGBUF_FULL = 0
SW_C_MAP_FULL = 1
SW_C_PENDING_FULL = 2
SW_C_EVENTS = 3
SW_C_MAX = 4
COUNTER_NAMES = ("ringbuf_full", "map_full", "pending_full", "events")


class SwSock(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("netns_cookie", ctypes.c_uint64),
        ("ts_ns", ctypes.c_uint64),
        ("local_addr", ctypes.c_uint8 * 16),  # network order
        ("remote_addr", ctypes.c_uint8 * 16),  # network order
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("local_port", ctypes.c_uint16),  # host order
        ("remote_port", ctypes.c_uint16),  # host order
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("comm", ctypes.c_char * SW_COMM_LEN),
    ]


class SwEvent(ctypes.Structure):
    _fields_ = [
        ("sock", SwSock),
        ("kind", ctypes.c_uint8),
        ("old_state", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("err", ctypes.c_int32),
    ]


class SwPending(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64)]


class AbiMismatch(RuntimeError):
    pass


def check_sizes(compiled: dict[str, int]) -> None:
    """compiled: struct name -> size the C compiler gave it."""
    ours = {"sw_sock": SwSock, "sw_event": SwEvent, "sw_pending": SwPending}
    for name, size in compiled.items():
        mine = ctypes.sizeof(ours[name])
        if mine != size:
            raise AbiMismatch(
                f"struct {name} is {size} bytes in bpf/sockwatch.h but {mine} in sockwatch/kernel/abi.py: "
                "update the ctypes mirror"
            )


def _addr(family: int, raw: ctypes.Array) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return _addr_cached(family, bytes(raw))


@functools.lru_cache(maxsize=65536)
def _addr_cached(family: int, b: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Events repeat few addresses; bounded, since remote peers are unbounded over time."""
    return ipaddress.IPv4Address(b[:4]) if family == 4 else ipaddress.IPv6Address(b)


def row_from_sock(s: SwSock, netns: int) -> SockRow:
    """A model row from the kernel's view of one socket (owner only if the hook had it)."""
    family = FAMILY_VERSION.get(s.family, 4)
    connected = s.remote_port != 0
    owner = bool(s.flags & SW_F_OWNER)
    return SockRow(
        cookie=s.cookie,
        protocol=s.protocol,
        family=family,
        state=s.state,
        local_address=_addr(family, s.local_addr),
        local_port=s.local_port,
        remote_address=_addr(family, s.remote_addr) if connected else None,
        remote_port=s.remote_port,
        netns=netns,
        pid=s.pid if owner else None,
        uid=s.uid if owner else None,
        comm=s.comm.decode(errors="replace") if owner else None,
        owner_source="hook" if owner else None,
        netns_cookie=s.netns_cookie,
        flags=s.flags,
        ts_ns=s.ts_ns,
    )


def tcp_state_after_close(old_state: int) -> int | None:
    """The state ss will show after a STATE_CB to CLOSE from old_state.

    The full socket is replaced by a time-wait socket after FIN-WAIT-2 and CLOSING; the
    hook sees only '-> CLOSE', so the tracker keeps the row as TIME-WAIT and lets a
    sock_diag read confirm it (a reset in FIN-WAIT-2 also ends in CLOSE).
    """
    if old_state in (TcpState.FIN_WAIT2, TcpState.CLOSING):
        return TcpState.TIME_WAIT
    return None
