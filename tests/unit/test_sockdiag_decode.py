"""Decoding of inet_diag messages, byte for byte as the kernel lays them out."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from sockwatch.kernel import sockdiag


def diag_msg(family, state, sport, dport, src, dst, cookie, uid, inode, dev=0, v6only=None, tail=b"") -> bytes:
    body = struct.pack("=BBBB", family, state, 0, 0)
    body += struct.pack(">HH", sport, dport)
    body += src.ljust(16, b"\0") + dst.ljust(16, b"\0")
    body += struct.pack("=I", dev) + struct.pack("=II", cookie & 0xFFFFFFFF, cookie >> 32)
    body += struct.pack("=IIIII", 0, 0, 0, uid, inode)
    body += struct.pack("=HHB3x", 5, 8, 0)  # an attribute (INET_DIAG_SHUTDOWN), skipped
    if v6only is not None:
        body += struct.pack("=HHB3x", 5, sockdiag.INET_DIAG_SKV6ONLY, int(v6only))
    body += tail
    return struct.pack("=IHHII", 16 + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def done() -> bytes:
    return struct.pack("=IHHII", 20, sockdiag.NLMSG_DONE, 2, 1, 0) + struct.pack("=i", 0)


def error(err: int) -> bytes:
    return struct.pack("=IHHII", 36, sockdiag.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -err) + b"\0" * 16


class Peer:
    """Plays the kernel's side of one dump: what it was asked, what it answers."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, _n: int) -> bytes:
        return self.chunks.pop(0)


def test_decodes_ports_addresses_cookie_and_inode():
    v4 = diag_msg(socket.AF_INET, 10, 8080, 0, bytes([127, 0, 0, 1]), b"", (7 << 32) | 9, 1000, 4242)
    peer = Peer(v4 + v4, done())
    (a, b) = list(sockdiag.dump(peer, 6, socket.AF_INET))  # type: ignore[arg-type]
    assert (a.local_address, a.local_port, a.state, a.cookie, a.uid, a.inode) == (
        ipaddress.ip_address("127.0.0.1"),
        8080,
        10,
        (7 << 32) | 9,
        1000,
        4242,
    )
    assert a.local_address is b.local_address  # one object per distinct address
    family, proto, _ext, _pad, states = struct.unpack_from("=BBBBI", peer.sent[0], 16)
    assert (family, proto, states) == (socket.AF_INET, 6, sockdiag.ALL_STATES)


def test_ipv6_and_messages_split_across_reads():
    src = ipaddress.ip_address("2001:db8::1").packed
    dst = ipaddress.ip_address("::ffff:10.0.0.2").packed
    m = diag_msg(socket.AF_INET6, 1, 443, 51000, src, dst, 3, 0, 77)
    out = list(sockdiag.dump(Peer(m, m, done()), 6, socket.AF_INET6))  # type: ignore[arg-type]
    assert len(out) == 2
    assert (str(out[0].remote_address), out[0].remote_port, out[0].family) == ("::ffff:a00:2", 51000, 6)


def test_no_ipv6_means_no_sockets_but_no_ipv4_handler_is_an_error():
    """ENOENT: IPv6 is not in this kernel (no sockets), or the tcp_diag/udp_diag module
    could not be loaded: then the dump is not empty, it is impossible, and says so."""
    assert list(sockdiag.dump(Peer(error(errno.ENOENT)), 17, socket.AF_INET6)) == []  # type: ignore[arg-type]
    with pytest.raises(sockdiag.SockDiagError, match="modprobe udp_diag"):
        list(sockdiag.dump(Peer(error(errno.ENOENT)), 17, socket.AF_INET))  # type: ignore[arg-type]


def test_other_errors_are_raised():
    with pytest.raises(sockdiag.SockDiagError):
        list(sockdiag.dump(Peer(error(errno.EPERM)), 6, socket.AF_INET))  # type: ignore[arg-type]


@pytest.mark.parametrize(("v6only", "tail", "want"), [
    (True, b"", True), (False, b"", False), (None, b"", False),
    (None, struct.pack("=HH", 200, sockdiag.INET_DIAG_SKV6ONLY), False),  # an attribute longer than the message
    (None, struct.pack("=HH", 2, 1), False),  # shorter than its own header: the walk stops
])  # fmt: skip
def test_v6only_and_bound_device_when_asked(v6only, tail, want):
    m = diag_msg(socket.AF_INET6, 10, 53, 0, bytes(16), b"", 1, 0, 9, dev=3, v6only=v6only, tail=tail)
    (got,) = sockdiag.dump(Peer(m, done()), 17, socket.AF_INET6, attrs=True)  # type: ignore[arg-type]
    assert (got.v6only, got.bound_dev) == (want, 3)
    (plain,) = sockdiag.dump(Peer(m, done()), 17, socket.AF_INET6)  # type: ignore[arg-type]
    assert plain.v6only is False  # not read unless asked
