"""The kernel's own socket tables through NETLINK_SOCK_DIAG (what ss reads).

Hand-rolled rather than pyroute2: one struct.unpack_from per message keeps a dump of
100,000 sockets at a fraction of a second, where building a pyroute2 message object per
socket costs several times that. Only the fixed inet_diag_msg header is read.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

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
_RTA = struct.Struct("=HH")

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, sockid(48)
_REQ = struct.Struct("=BBBBI48s")
# inet_diag_msg: family, state, timer, retrans, sport, dport (big-endian), src, dst, if,
# cookie (two host-order u32 = one little-endian u64 here), expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("<BBBBHH16s16sIQIIIII")
_FAMILY: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}


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
    expires_ms: int = 0  # a TIME-WAIT socket: milliseconds until the kernel drops it
    bound_dev: int = 0  # SO_BINDTODEVICE's ifindex (idiag_if); 0: any
    v6only: bool = False  # IPV6_V6ONLY (INET_DIAG_SKV6ONLY), read only when asked for (attrs=True)


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


def dump(
    sock: socket.socket,
    protocol: int,
    family: int,
    states: int = ALL_STATES,
    cache: AddrCache | None = None,
    attrs: bool = False,
) -> Iterator[DiagSock]:
    """Every socket of (protocol, family) in the namespace of `sock`. attrs: also read
    the attributes after each message (IPV6_V6ONLY), which a table dump does without."""
    cache = cache or AddrCache()
    req = _REQ.pack(family, protocol, 0, 0, states, b"\0" * 48)
    seq = 1
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req)
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
                (err,) = struct.unpack_from("=i", data, off + hdr_size)
                if err == 0:
                    return
                if -err == errno.ENOENT and family == socket.AF_INET6:  # no IPv6 here: no sockets
                    return
                if -err == errno.ENOENT:  # the kernel could not load its tcp_diag/udp_diag module
                    raise SockDiagError(
                        -err,
                        f"sock_diag has no {_PROTO_NAME.get(protocol, protocol)} handler "
                        f"(modprobe {_PROTO_NAME.get(protocol, protocol)}_diag)",
                    )
                raise SockDiagError(-err, f"sock_diag dump failed: {errno.errorcode.get(-err, -err)}")
            if mtype == SOCK_DIAG_BY_FAMILY:
                (_f, state, _t, _r, sport, dport, src, dst, dev, cookie, expires, _rq, _wq, uid, inode) = msg_unpack(
                    data, off + hdr_size
                )
                v6only = False
                if attrs:
                    v6only = _v6only(data, off + hdr_size + _MSG.size, off + min(length, end - off))
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
                )
            if length < hdr_size:
                raise SockDiagError(errno.EPROTO, "malformed netlink message")
            off += (length + 3) & ~3


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


def dump_all(
    sock: socket.socket,
    protocols: tuple[int, ...] = (IPPROTO_TCP, IPPROTO_UDP),
    states: int = ALL_STATES,
    attrs: bool = False,
) -> list[DiagSock]:
    """TCP and UDP, IPv4 and IPv6, in the namespace of `sock`."""
    cache = AddrCache()
    out: list[DiagSock] = []
    for proto in protocols:
        for family in (socket.AF_INET, socket.AF_INET6):
            out.extend(dump(sock, proto, family, states, cache=cache, attrs=attrs))
    return out
