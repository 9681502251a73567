"""The kernel's own socket tables through NETLINK_SOCK_DIAG (what ss reads).

Hand-rolled rather than pyroute2: one struct.unpack_from per message keeps a dump of
100,000 sockets at a fraction of a second, where building a pyroute2 message object per
socket costs several times that. Only the fixed inet_diag_msg header is read.
"""

from __future__ import annotations

import errno
import ipaddress
import queue
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
# TCP states 0..11 as ss -a asks (request sockets are reported as SYN-RECV).
ALL_STATES = 0xFFF
LISTEN_ONLY = 1 << 10  # the kernel then walks the listener hash only
INET_DIAG_SKV6ONLY = 11  # an rtattr after inet_diag_msg, on every AF_INET6 socket
INET_DIAG_SKMEMINFO = 7  # an rtattr of u32s (SK_MEMINFO_*), sent when asked for in idiag_ext
EXT_SKMEMINFO = 1 << (INET_DIAG_SKMEMINFO - 1)
SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF, SK_MEMINFO_DROPS = 0, 1, 8
_NO_MEMINFO = (-1, -1, -1)  # (rmem, rcvbuf, drops) not read
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_LEN_TYPE = struct.Struct("=IH")
_KEY = struct.Struct("<BHH16s16sIQII")  # a ChangedRead key, as dump_changed cuts it
_DONE_SIZE = 20
_NO_ATTRS = 16 + 72  # nlmsghdr and inet_diag_msg: a message with no attributes (a TIME-WAIT socket's)

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, sockid(48)
_REQ = struct.Struct("=BBBBI48s")
# inet_diag_msg: family, state, timer, retrans, sport, dport (big-endian), src, dst, if,
# cookie (two host-order u32 = one little-endian u64 here), expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("<BBBBHH16s16sIQIIIII")
_FAMILY: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}
T = TypeVar("T")


class SockDiagError(OSError):
    pass


@dataclass(slots=True)
class DiagSock:
    protocol: int
    family: int  # 4 or 6
    state: int
    local_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    local_port: int
    remote_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_port: int
    cookie: int
    uid: int
    inode: int
    expires_ms: int = 0  # the socket's timer: for a timewait one, milliseconds until the kernel drops it
    bound_dev: int = 0  # SO_BINDTODEVICE's ifindex (idiag_if); 0: any
    v6only: bool = False  # IPV6_V6ONLY (INET_DIAG_SKV6ONLY), read only when asked for (attrs=True)
    # a timewait socket (TIME-WAIT, or a FIN-WAIT-2 orphan past its timeout): it goes when
    # its timer ends, and no hook sees that
    timewait: bool = False
    # idiag_rqueue/wqueue: a listener's accept queue and its limit (the backlog); a UDP
    # socket's bytes queued to read and to send (what ss prints as Recv-Q and Send-Q)
    rqueue: int = 0
    wqueue: int = 0
    # SK_MEMINFO (read only when asked for, meminfo=True): the receive memory in use and
    # its limit (SO_RCVBUF: what ss -m prints as r and rb), and the packets the socket
    # dropped (sk_drops, ss -m's d); -1: not read
    rmem: int = -1
    rcvbuf: int = -1
    drops: int = -1


class AddrCache:
    """Sockets share few addresses: build each ipaddress object once per dump (keyed by
    the 16 bytes the kernel sends, one dict per family: this runs twice per socket)."""

    def __init__(self) -> None:
        self.v4: dict[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self.v6: dict[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}

    def get(self, family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        c = self.v4 if family == 4 else self.v6
        a = c.get(raw)
        if a is None:
            a = c[raw] = ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)
        return a


def open_diag_socket() -> socket.socket:
    """A sock_diag socket in the calling thread's network namespace."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    s.bind((0, 0))
    return s


_PROTO_NAME = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


def _ask_dump(sock: socket.socket, protocol: int, family: int, states: int, ext: int = 0) -> None:
    """Ask for every socket of (protocol, family) in `states` (the answer is read after);
    `ext`: the INET_DIAG_* attributes to add (bits, as idiag_ext takes them)."""
    req = _REQ.pack(family, protocol, ext, 0, states, b"\0" * 48)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)


def dump(
    sock: socket.socket,
    protocol: int,
    family: int,
    states: int = ALL_STATES,
    cache: AddrCache | None = None,
    attrs: bool = False,
    meminfo: bool = False,
) -> Iterator[DiagSock]:
    """Every socket of (protocol, family) in the namespace of `sock`. attrs: also read
    the attributes after each message (IPV6_V6ONLY), which a table dump does without;
    meminfo: also the socket's memory and drops (SK_MEMINFO)."""
    cache = cache or AddrCache()
    _ask_dump(sock, protocol, family, states, EXT_SKMEMINFO if meminfo else 0)
    msg_unpack = _MSG.unpack_from
    hdr_unpack = _NLMSGHDR.unpack_from
    hdr_size = _NLMSGHDR.size
    fam = _FAMILY[family]
    addrs = cache.v4 if fam == 4 else cache.v6
    addr = addrs.get
    make = cache.get
    while True:
        data = sock.recv(1 << 20)
        off = 0
        end = len(data)
        while off + hdr_size <= end:
            length, mtype, _flags, _seq, _pid = hdr_unpack(data, off)
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                _raise_error(data, off + hdr_size, protocol, family)
                return
            if mtype == SOCK_DIAG_BY_FAMILY:
                (_f, state, timer, _r, sport, dport, src, dst, dev, cookie, expires, rq, wq, uid, inode) = msg_unpack(
                    data, off + hdr_size
                )
                v6only = False
                if attrs:
                    v6only = _v6only(data, off + hdr_size + _MSG.size, off + min(length, end - off))
                mem = _NO_MEMINFO
                if meminfo:
                    mem = _skmeminfo(data, off + hdr_size + _MSG.size, off + min(length, end - off))
                yield DiagSock(
                    protocol,
                    fam,
                    state,
                    addr(src) or make(fam, src),
                    ((sport & 0xFF) << 8) | (sport >> 8),  # network order (inline: twice per socket)
                    addr(dst) or make(fam, dst),
                    ((dport & 0xFF) << 8) | (dport >> 8),
                    cookie,
                    uid,
                    inode,
                    expires,
                    dev,
                    v6only,
                    timer == TIMER_TIMEWAIT,
                    rq,
                    wq,
                    *mem,
                )
            if length < hdr_size:
                raise SockDiagError(errno.EPROTO, "malformed netlink message")
            off += (length + 3) & ~3


# What a row shows of an inet_diag_msg, as one bytes object: state, ports, addresses, device,
# cookie, uid, inode. Not the timers or queues, which move on every busy connection.
# A connection read compares these to the last read's and decodes only the ones that differ.
KEY_COOKIE = slice(41, 49)  # where the cookie is in such a key (little-endian u64)
# idiag_timer of a timewait socket. Not the state: a FIN-WAIT-2 orphan past its timeout
# lives on as a timewait socket in state FIN-WAIT-2, and goes as silently.
TIMER_TIMEWAIT = 3


def cookie_of_key(key: bytes) -> int:
    return int.from_bytes(key[KEY_COOKIE], "little")


@dataclass(slots=True)
class ChangedRead(Generic[T]):
    """One connection read, against the keys of the last (`known`): what differs."""

    known: set[bytes] | frozenset[bytes]
    seen: set[bytes] = field(default_factory=set)  # every key read (the next read's `known`)
    # new, or something shown differs: each with the tag of the socket it was read through
    changed: list[tuple[DiagSock, T]] = field(default_factory=list)
    timewait_ms: int = -1  # the soonest end of a timewait socket read, in ms from now (-1: none)
    fresh: int = 0  # keys read that were not known
    cache: AddrCache = field(default_factory=AddrCache)

    def gone(self) -> set[int]:
        """Cookies read last time and not this time (a changed socket is not gone)."""
        if len(self.known) - (len(self.seen) - self.fresh) == 0:
            return set()  # every key known before was read again
        out = {cookie_of_key(k) for k in self.known - self.seen}
        out.difference_update(d.cookie for d, _tag in self.changed)
        return out


# Readers at once: two cores' worth. Each namespace's dump walks the host's whole TCP
# hash (it is shared), so with several namespaces their walks overlap on two cores.
READERS = 2
_Framed = tuple[Any, int, bytes, int, int]  # (tag, family, data, where its sockets end, their length or 0)


def dump_changed(
    socks: Sequence[tuple[T, socket.socket]], protocol: int, families: tuple[int, ...], states: int,
    read: ChangedRead[T],
) -> None:  # fmt: skip
    """Like dump() for each of `families` through each socket (its namespace's), adding
    to `read` (with the socket's tag) only the sockets whose key is not in read.known: a
    read of 100,000 connections where a few changed decodes those few. A buffer of
    messages of one length (the common case: sockets of one kind carry the same
    attributes) is cut into keys by struct, in C; any other, message by message.

    Threads of their own receive: the kernel builds each buffer inside recv() with the
    GIL released, so cutting one buffer here hides behind the kernel building the next,
    and two namespaces' walks run on two cores. The first error ends the read and is
    raised here once every reader has stopped (no socket is left mid-dump)."""
    todo: queue.SimpleQueue[tuple[T, socket.socket]] = queue.SimpleQueue()
    for tagged in socks:
        todo.put(tagged)
    got: queue.SimpleQueue[_Framed | BaseException | None] = queue.SimpleQueue()
    stop = threading.Event()
    args = (todo, protocol, families, states, got, stop)
    readers = [threading.Thread(target=_receive, args=args, name="sockdiag-read", daemon=True)
               for _ in range(min(READERS, len(socks)))]  # fmt: skip
    for r in readers:
        r.start()
    try:
        running = len(readers)
        while running:
            item = got.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                tag, family, data, end, length = item
                _take(tag, family, data, end, length, protocol, read)
    finally:
        stop.set()
        for r in readers:
            r.join()


def _receive(
    todo: queue.SimpleQueue[tuple[T, socket.socket]], protocol: int, families: tuple[int, ...], states: int,
    out: queue.SimpleQueue[_Framed | BaseException | None], stop: threading.Event,
) -> None:  # fmt: skip
    """A reading thread: socket by socket from `todo` until it is empty or `stop` is set,
    each buffer framed; an error is passed on and ends this reader; None: it ended."""
    try:
        while not stop.is_set():
            try:
                tag, sock = todo.get_nowait()
            except queue.Empty:
                return
            for family in families:
                _ask_dump(sock, protocol, family, states)
                while True:
                    data = sock.recv(1 << 20)
                    end, last, length = _messages_end(data, protocol, family)
                    if length and not _one_run(data, end, length):  # only looked like one: every length checked
                        end, last, length = _messages_end(data, protocol, family, fast=False)
                    if end:
                        out.put((tag, family, data, end, length))
                    if last:
                        break
    except BaseException as e:  # the asking thread raises it
        out.put(e)
    finally:
        out.put(None)


def _take(tag: T, family: int, data: bytes, end: int, length: int, protocol: int, read: ChangedRead[T]) -> None:
    """One framed buffer into `read`: its new keys decoded, every key kept, the soonest
    timewait end."""
    if length:
        _heads, cut, timers = _uniform(length)
        view = memoryview(data)[:end]
        keys = set(map(b"".join, cut.iter_unpack(view)))
    else:
        keys = _keys_one_by_one(data, end)
    fam = _FAMILY[family]
    for k in keys.difference(read.known):
        read.changed.append((_from_key(k, protocol, fam, read.cache), tag))
        read.fresh += 1
    read.seen |= keys
    if length:  # distinct (timer, expiry) pairs in C first: an idle connection's are all alike
        pairs = set(timers.iter_unpack(view))
        read.timewait_ms = _soonest(read.timewait_ms, (e for t, e in pairs if t == TIMER_TIMEWAIT))
    else:
        read.timewait_ms = _soonest(read.timewait_ms, _timewait_one_by_one(data, end))


def _messages_end(data: bytes, protocol: int, family: int, fast: bool = True) -> tuple[int, bool, int]:
    """(where a buffer's socket messages end, whether the dump ends with them, the
    length of every message when they look like one run of it else 0; fast=False:
    never guessed, every message walked). An NLMSG_ERROR that ends the dump is raised."""
    hs = _NLMSGHDR.size
    end = len(data)
    if fast and end >= hs:
        length, mtype = _LEN_TYPE.unpack_from(data, 0)
        if mtype == SOCK_DIAG_BY_FAMILY and length >= _NO_ATTRS and not length % 4:
            # one length throughout is likely: the run's last message is checked here, all of them in _keys_of_run
            if not end % length and _LEN_TYPE.unpack_from(data, end - length) == (length, SOCK_DIAG_BY_FAMILY):
                return end, False, length
            body = end - _DONE_SIZE
            if body > 0 and not body % length and _LEN_TYPE.unpack_from(data, body)[1] == NLMSG_DONE:
                return body, True, length
    off = 0
    while off + hs <= end:
        length, mtype = _LEN_TYPE.unpack_from(data, off)
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            if mtype == NLMSG_ERROR:
                _raise_error(data, off + hs, protocol, family)
            return off, True, 0
        if length < _NO_ATTRS or off + length > end or mtype != SOCK_DIAG_BY_FAMILY:
            raise SockDiagError(errno.EPROTO, "malformed sock_diag message")
        off += (length + 3) & ~3
    return off, False, 0


def _one_run(data: bytes, end: int, length: int) -> bool:
    """Whether every message in data[:end] is a socket's of `length` bytes."""
    return set(_uniform(length)[0].iter_unpack(memoryview(data)[:end])) == {(length, SOCK_DIAG_BY_FAMILY)}


def _keys_one_by_one(data: bytes, end: int) -> set[bytes]:
    keys = set()
    off = 0
    while off < end:
        (length,) = _U32.unpack_from(data, off)
        m = off + _NLMSGHDR.size
        keys.add(data[m + 1 : m + 2] + data[m + 4 : m + 52] + data[m + 64 : m + 72])
        off += (length + 3) & ~3
    return keys


def _timewait_one_by_one(data: bytes, end: int) -> Iterator[int]:
    off = 0
    while off < end:
        (length,) = _U32.unpack_from(data, off)
        m = off + _NLMSGHDR.size
        if data[m + 2] == TIMER_TIMEWAIT:
            yield _U32.unpack_from(data, m + 52)[0]
        off += (length + 3) & ~3


def _soonest(now: int, ends: Iterable[int]) -> int:
    soonest = min(ends, default=-1)
    return soonest if now < 0 or (0 <= soonest < now) else now


_runs: dict[int, tuple[struct.Struct, struct.Struct, struct.Struct]] = {}


def _uniform(length: int) -> tuple[struct.Struct, struct.Struct, struct.Struct]:
    """For a run of `length`-byte messages: each one's (length, type), the three pieces
    of its key, and its (timer, expiry)."""
    got = _runs.get(length)
    if got is None:
        rest = length - _NO_ATTRS
        got = _runs[length] = (
            struct.Struct(f"=IH{length - 6}x"),
            struct.Struct(f"=17x1s2x48s12x8s{rest}x"),
            struct.Struct(f"=18xB49xI{rest + 16}x"),
        )
    return got


def _from_key(k: bytes, protocol: int, fam: int, cache: AddrCache) -> DiagSock:
    state, sport, dport, src, dst, dev, cookie, uid, inode = _KEY.unpack(k)
    return DiagSock(protocol, fam, state, cache.get(fam, src), ((sport & 0xFF) << 8) | (sport >> 8),
                    cache.get(fam, dst), ((dport & 0xFF) << 8) | (dport >> 8), cookie, uid, inode, 0, dev)  # fmt: skip


def _raise_error(data: bytes, at: int, protocol: int, family: int) -> None:
    """An NLMSG_ERROR ending a dump: nothing for 0 (done) or for ENOENT on AF_INET6
    (no IPv6 here: no sockets); a SockDiagError for anything else."""
    (err,) = struct.unpack_from("=i", data, at)
    if err == 0 or (-err == errno.ENOENT and family == socket.AF_INET6):
        return
    name = _PROTO_NAME.get(protocol, protocol)
    if -err == errno.ENOENT:  # the kernel could not load its tcp_diag/udp_diag module
        raise SockDiagError(-err, f"sock_diag has no {name} handler (modprobe {name}_diag)")
    raise SockDiagError(-err, f"sock_diag dump failed: {errno.errorcode.get(-err, -err)}")


def _v6only(data: bytes, off: int, end: int) -> bool:
    """INET_DIAG_SKV6ONLY among the rtattrs in data[off:end] (bounds checked: bytes
    from the kernel, but a parser never reads past what it was given)."""
    while off + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, off)
        if length < _RTA.size or off + length > end:
            return False
        if kind == INET_DIAG_SKV6ONLY and length >= _RTA.size + 1:
            return data[off + _RTA.size] != 0
        off += (length + 3) & ~3
    return False


def _skmeminfo(data: bytes, off: int, end: int) -> tuple[int, int, int]:
    """(rmem, rcvbuf, drops) from INET_DIAG_SKMEMINFO among the rtattrs in data[off:end],
    or -1s where it is absent or short (bounds checked, as _v6only)."""
    while off + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, off)
        if length < _RTA.size or off + length > end:
            break
        if kind == INET_DIAG_SKMEMINFO and length >= _RTA.size + 4 * (SK_MEMINFO_DROPS + 1):
            base = off + _RTA.size
            return (_U32.unpack_from(data, base + 4 * SK_MEMINFO_RMEM_ALLOC)[0],
                    _U32.unpack_from(data, base + 4 * SK_MEMINFO_RCVBUF)[0],
                    _U32.unpack_from(data, base + 4 * SK_MEMINFO_DROPS)[0])  # fmt: skip
        off += (length + 3) & ~3
    return _NO_MEMINFO


def dump_all(
    sock: socket.socket,
    protocols: tuple[int, ...] = (IPPROTO_TCP, IPPROTO_UDP),
    states: int = ALL_STATES,
    attrs: bool = False,
    meminfo: bool = False,
) -> list[DiagSock]:
    """TCP and UDP, IPv4 and IPv6, in the namespace of `sock`."""
    cache = AddrCache()
    out: list[DiagSock] = []
    for proto in protocols:
        for family in (socket.AF_INET, socket.AF_INET6):
            out.extend(dump(sock, proto, family, states, cache=cache, attrs=attrs, meminfo=meminfo))
    return out
