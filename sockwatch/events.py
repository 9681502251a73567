"""What the kernel hooks report, as plain values (pure; no root).

An `Event` is one ring-buffer record decoded once, at the edge (kernel/abi.py): the
tracker applies them, and an event stream can fan them out without touching kernel
memory. Addresses stay as the 16 raw bytes the hook wrote (network order, IPv4 in the
first four); the tracker turns them into ipaddress objects only for rows it keeps.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, TcpState

# kinds (bpf/sockwatch.h SW_EV_*)
BIND = 1
LISTEN = 2
CONNECT = 3
ESTABLISHED = 4  # reserved: an active open is confirmed by a kernel read
ACCEPT = 5
STATE = 6
UDP_CONNECT = 7
RELEASE = 8
BIND_FAIL = 9
KIND_NAMES = {
    BIND: "bind",
    LISTEN: "listen",
    CONNECT: "connect",
    ESTABLISHED: "established",
    ACCEPT: "accept",
    STATE: "state",
    UDP_CONNECT: "udp_connect",
    RELEASE: "release",
    BIND_FAIL: "bind_fail",
}

# flags (SW_F_*)
F_OWNER = 0x01  # pid/uid/comm came from the owner's own syscall
F_PRESTART = 0x02  # RELEASE of a TCP listener (one from before start has no state callbacks)
F_LIFETIME = 0x04  # STATE to CLOSE: comm holds bytes acked/received, pid retransmits, uid srtt (µs)
F_PORT_ASKED = 0x08  # BIND, BIND_FAIL: bind() named the port (else the kernel chose it)

# bind_opts (SW_B_*): what `sockwatch explain bind` needs to replay a failed bind
B_KNOWN = 0x01  # the options were read
B_REUSEADDR = 0x02
B_REUSEPORT = 0x04
B_DEVICE = 0x08  # bound to a device: its ifindex in remote_addr's first four bytes (host order)

TCP_GONE_AT_RELEASE = (TcpState.CLOSE, TcpState.LISTEN, TcpState.SYN_SENT)


class Event(NamedTuple):
    """One change to one socket, in the order of bpf/sockwatch.h's struct sw_event."""

    cookie: int
    netns_cookie: int
    ts_ns: int  # CLOCK_MONOTONIC_COARSE at the hook
    local_addr: bytes  # 16 bytes, network order
    remote_addr: bytes
    pid: int
    uid: int
    local_port: int
    remote_port: int
    family: int  # AF_INET / AF_INET6
    protocol: int
    kind: int
    state: int  # TCP_* numbering after the change (UDP: CLOSE unconnected, ESTABLISHED connected)
    old_state: int
    flags: int
    bind_opts: int  # BIND_FAIL: B_* (the socket's options as bind() saw them)
    err: int
    comm: bytes  # NUL padded

    @property
    def has_owner(self) -> bool:
        """pid, uid and comm are the owner's (a lifetime record carries counts there)."""
        return self.flags & (F_OWNER | F_LIFETIME) == F_OWNER


class Decoded(NamedTuple):
    """What a record says of its socket, decoded once for the table and the stream alike."""

    family: int  # 4 or 6
    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None: not connected
    owner: tuple[int, int, str] | None  # (pid, uid, comm) from the owner's own syscall


def decode(e: Event) -> Decoded:
    family = 6 if e.family == socket.AF_INET6 else 4
    return Decoded(
        family,
        address(family, e.local_addr),
        address(family, e.remote_addr) if e.remote_port else None,
        (e.pid, e.uid, _comm(e.comm)) if e.has_owner else None,
    )


# Records repeat few addresses and names; bounded, since remote peers are unbounded over time.
@functools.lru_cache(maxsize=65536)
def address(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)


@functools.lru_cache(maxsize=4096)
def _comm(raw: bytes) -> str:
    return comm_text(raw)


_LIFE = struct.Struct("<QQ")  # the union over comm in struct sw_event


def comm_text(raw: bytes) -> str:
    """A task name as a hook copied it: up to its first NUL. Before 6.2 or so,
    bpf_get_current_comm() does not clear what follows the name (strscpy without _pad),
    so the rest of the field is what an older record left in the ring."""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def life(e: Event) -> tuple[int, int]:
    """(bytes acked, bytes received) of a STATE record with F_LIFETIME."""
    acked, received = _LIFE.unpack(e.comm)
    return acked, received


def tcp_state_after_close(old_state: int) -> int | None:
    """The state ss will show after a STATE_CB to CLOSE from old_state.

    The full socket is replaced by a time-wait socket after FIN-WAIT-2 and CLOSING; the
    hook sees only '-> CLOSE', so the tracker keeps the row as TIME-WAIT and lets a
    sock_diag read confirm it (a reset in FIN-WAIT-2 also ends in CLOSE).
    """
    if old_state in (TcpState.FIN_WAIT2, TcpState.CLOSING):
        return TcpState.TIME_WAIT
    return None


def _ends(kind: int, protocol: int, state: int, old_state: int) -> bool:
    if kind == RELEASE:
        return protocol == IPPROTO_UDP or old_state in TCP_GONE_AT_RELEASE
    if kind == STATE and protocol == IPPROTO_TCP and state == TcpState.CLOSE:
        return tcp_state_after_close(old_state) is None
    return False


class _EndsTable(dict):
    """_ends memoized on (kind, protocol, state, old_state): a few dozen keys ever occur,
    so a batch asks it with one C-level map instead of a Python call per record."""

    def __missing__(self, key: tuple[int, int, int, int]) -> bool:
        value = self[key] = _ends(*key)
        return value


ENDS = _EndsTable()


def ends_socket(e: Event) -> bool:
    """True if after this event the socket is in no kernel lookup table and never will
    be again under this cookie: nothing of it needs to stay in the table."""
    return ENDS[e.kind, e.protocol, e.state, e.old_state]


class EventBatch:
    """Events in ring order, as columns plus an event decoded on demand.

    Under churn nearly every record belongs to a socket born and gone within one batch;
    the tracker recognises those from the columns alone (cookie, kind, protocol, state,
    old state) and asks for Event values only for the records it applies. `event(i)`
    decodes record i from the batch's own copy, never from kernel memory.
    """

    __slots__ = ("cookies", "event", "kinds", "old_states", "protocols", "states")

    def __init__(
        self,
        cookies: list[int],
        kinds: Sequence[int],
        protocols: Sequence[int],
        states: Sequence[int],
        old_states: Sequence[int],
        event: Callable[[int], Event],
    ) -> None:
        self.cookies = cookies
        self.kinds = kinds
        self.protocols = protocols
        self.states = states
        self.old_states = old_states
        self.event = event

    @classmethod
    def of(cls, events: Sequence[Event]) -> EventBatch:
        events = list(events)
        return cls(
            [e.cookie for e in events],
            [e.kind for e in events],
            [e.protocol for e in events],
            [e.state for e in events],
            [e.old_state for e in events],
            events.__getitem__,
        )

    def __len__(self) -> int:
        return len(self.cookies)

    def ends(self) -> list[bool]:
        """ends_socket for every record, in order."""
        return list(map(ENDS.__getitem__, zip(self.kinds, self.protocols, self.states, self.old_states, strict=True)))

    def events(self) -> list[Event]:
        return [self.event(i) for i in range(len(self.cookies))]
