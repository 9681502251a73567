"""Decoding of inet_diag messages, byte for byte as the kernel lays them out."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from sockwatch.kernel import sockdiag


def diag_msg(family, state, sport, dport, src, dst, cookie, uid, inode, dev=0, v6only=None, tail=b"",
             expires=0, queues=(0, 0), attrs=True, timer=None) -> bytes:  # fmt: skip
    if timer is None:
        timer = sockdiag.TIMER_TIMEWAIT if state == 6 else 0
    body = struct.pack("=BBBB", family, state, timer, 0)
    body += struct.pack(">HH", sport, dport)
    body += src.ljust(16, b"\0") + dst.ljust(16, b"\0")
    body += struct.pack("=I", dev) + struct.pack("=II", cookie & 0xFFFFFFFF, cookie >> 32)
    body += struct.pack("=IIIII", expires, *queues, uid, inode)
    if attrs:
        body += struct.pack("=HHB3x", 5, 8, 0)  # an attribute (INET_DIAG_SHUTDOWN), skipped
    if v6only is not None:
        body += struct.pack("=HHB3x", 5, sockdiag.INET_DIAG_SKV6ONLY, int(v6only))
    body += tail
    return struct.pack("=IHHII", 16 + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def done() -> bytes:
    return struct.pack("=IHHII", 20, sockdiag.NLMSG_DONE, 2, 1, 0) + struct.pack("=i", 0)


def error(err: int) -> bytes:
    return struct.pack("=IHHII", 36, sockdiag.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -err) + b"\0" * 16


def at(*chunks: bytes) -> list[tuple[str, Peer]]:
    """One socket to read through, tagged "ns"."""
    return [("ns", Peer(*chunks))]


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


def test_a_changed_read_decodes_only_what_a_row_shows_differently():
    lo, peer = bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2])

    def conn(cookie, state=1, inode=10, expires=0, queues=(0, 0)):
        return diag_msg(socket.AF_INET, state, 4000 + cookie, 443, lo, peer, cookie, 0, inode,
                        expires=expires, queues=queues)  # fmt: skip

    first = sockdiag.ChangedRead(frozenset())
    sockdiag.dump_changed(at(conn(1) + conn(2), conn(3, state=6, inode=0, expires=900), done()),  # type: ignore[arg-type]
                          6, (socket.AF_INET,), 0xFFF, first)  # fmt: skip
    assert sorted(d.cookie for d, _ in first.changed) == [1, 2, 3] and first.gone() == set()
    assert first.timewait_ms == 900
    one = next(d for d, _ in first.changed if d.cookie == 1)
    assert (one.local_port, one.remote_address, one.state, one.inode) == (
        4001,
        ipaddress.ip_address("127.0.0.2"),
        1,
        10,
    )

    # 1: queues and timers moved (not shown: not decoded); 2: gone; 3: its TIME-WAIT
    # clock ran (not decoded, but still the soonest end); 4: new; 5 in the next buffer: its inode changed
    second = sockdiag.ChangedRead(first.seen)
    sockdiag.dump_changed(
        at(conn(1, queues=(5, 9)) + conn(3, state=6, inode=0, expires=400) + conn(4), conn(5), done()),  # type: ignore[arg-type]
        6,
        (socket.AF_INET,),
        0xFFF,
        second,
    )
    assert sorted(d.cookie for d, _ in second.changed) == [4, 5] and second.gone() == {2}
    assert second.timewait_ms == 400
    third = sockdiag.ChangedRead(second.seen)
    sockdiag.dump_changed(at(conn(1), conn(5, inode=11), error(0)), 6, (socket.AF_INET,), 0xFFF, third)  # type: ignore[arg-type]
    assert [d.cookie for d, _ in third.changed] == [5] and third.gone() == {3, 4}  # 5 changed, not gone
    assert third.timewait_ms == -1

    with pytest.raises(sockdiag.SockDiagError):
        sockdiag.dump_changed(at(error(errno.EPERM)), 6, (socket.AF_INET,), 0xFFF, sockdiag.ChangedRead(frozenset()))  # type: ignore[arg-type]
    short = conn(1)[:40]
    short = struct.pack("=I", 80) + short[4:]  # says 80 bytes, brings 40
    with pytest.raises(sockdiag.SockDiagError):
        sockdiag.dump_changed(at(short), 6, (socket.AF_INET,), 0xFFF, sockdiag.ChangedRead(frozenset()))  # type: ignore[arg-type]


def _mixed(n: int) -> list[bytes]:
    """n sockets as the kernel mixes them: TIME-WAIT without attributes, others with."""
    out = []
    for c in range(1, n + 1):
        tw = c % 3 == 0
        out.append(diag_msg(socket.AF_INET6, 6 if tw else 1, 1000 + c, 443, bytes(15) + b"\1", bytes(15) + b"\2",
                            c << 20, 0 if tw else 1000, 0 if tw else 50 + c, expires=10_000 - c if tw else 0,
                            attrs=not tw))  # fmt: skip
    return out


@pytest.mark.parametrize("layout", ["one run per buffer, done apart", "a run and its done", "mixed lengths",
                                    "mixed, done in the buffer", "a short buffer"])  # fmt: skip
def test_a_changed_read_agrees_with_a_whole_dump_however_the_kernel_cuts_its_buffers(layout):
    msgs = _mixed(30)
    if layout == "one run per buffer, done apart":
        chunks = [
            b"".join(m for m in msgs if len(m) == len(msgs[0])),
            b"".join(m for m in msgs if len(m) != len(msgs[0])),
            done(),
        ]
    elif layout == "a run and its done":
        chunks = [b"".join(m for m in msgs if len(m) == len(msgs[0])) + done()]
        msgs = [m for m in msgs if len(m) == len(msgs[0])]
    elif layout == "mixed lengths":
        chunks = [b"".join(msgs[:17]), b"".join(msgs[17:]), done()]
    elif layout == "mixed, done in the buffer":
        chunks = [b"".join(msgs) + done()]
    else:
        chunks = [msgs[0], done()]
        msgs = msgs[:1]
    whole = list(sockdiag.dump(Peer(*chunks), 6, socket.AF_INET6))  # type: ignore[arg-type]
    read = sockdiag.ChangedRead(frozenset())
    sockdiag.dump_changed(at(*chunks), 6, (socket.AF_INET6,), 0xFFF, read)  # type: ignore[arg-type]
    fields = ("state", "local_address", "local_port", "remote_address", "remote_port", "cookie", "uid", "inode")
    assert sorted(tuple(getattr(d, f) for f in fields) for d, _ in read.changed) == sorted(
        tuple(getattr(d, f) for f in fields) for d in whole)  # fmt: skip
    tws = [d.expires_ms for d in whole if d.timewait]
    assert read.timewait_ms == (min(tws) if tws else -1)
    again = sockdiag.ChangedRead(read.seen)
    sockdiag.dump_changed(at(*chunks), 6, (socket.AF_INET6,), 0xFFF, again)  # type: ignore[arg-type]
    assert again.changed == [] and again.gone() == set() and again.seen == read.seen


def test_a_buffer_that_only_looks_like_one_run_is_walked_and_a_malformed_one_refused():
    lo = bytes([127, 0, 0, 1])

    def m(cookie, **kw):
        return diag_msg(socket.AF_INET, 1, 4000 + cookie, 443, lo, lo, cookie, 0, 10 + cookie, **kw)

    # 96 + 100 + 92 + 96 bytes: the first and the last are 96 long, and 384 is 4 x 96
    odd = m(1) + m(2, tail=bytes(4)) + m(3, attrs=False, tail=bytes(4)) + m(4)
    assert len(odd) == 384 and len(m(1)) == 96
    read = sockdiag.ChangedRead(frozenset())
    sockdiag.dump_changed(at(odd, done()), 6, (socket.AF_INET,), 0xFFF, read)  # type: ignore[arg-type]
    assert sorted((d.cookie, d.inode) for d, _ in read.changed) == [(1, 11), (2, 12), (3, 13), (4, 14)]
    # the same shape with a zero length inside: refused, not walked forever
    broken = bytearray(odd)
    struct.pack_into("=I", broken, 96, 0)
    with pytest.raises(sockdiag.SockDiagError):
        sockdiag.dump_changed(at(bytes(broken), done()), 6, (socket.AF_INET,), 0xFFF,  # type: ignore[arg-type]
                              sockdiag.ChangedRead(frozenset()))  # fmt: skip


def test_a_changed_read_of_two_namespaces_and_families_tags_each_socket_and_leaves_no_thread():
    import threading

    def v4(cookie):
        lo, peer = bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2])
        return diag_msg(socket.AF_INET, 1, 4000 + cookie, 443, lo, peer, cookie, 0, 11)

    def v6(cookie):
        return diag_msg(socket.AF_INET6, 1, 4000 + cookie, 443, bytes(15) + b"\1", bytes(15) + b"\2", cookie, 0, 12,
                        v6only=False)  # fmt: skip

    a, b = Peer(v4(1), done(), v6(2) + done()), Peer(v4(3) + v4(4) + done(), done())
    read: sockdiag.ChangedRead[str] = sockdiag.ChangedRead(frozenset())
    sockdiag.dump_changed([("a", a), ("b", b)], 6, (socket.AF_INET, socket.AF_INET6), 0xFFF, read)  # type: ignore[list-item]
    assert sorted((d.cookie, d.family, str(d.local_address), tag) for d, tag in read.changed) == [
        (1, 4, "127.0.0.1", "a"), (2, 6, "::1", "a"), (3, 4, "127.0.0.1", "b"), (4, 4, "127.0.0.1", "b")]  # fmt: skip
    for p in (a, b):
        assert [r[16] for r in p.sent] == [socket.AF_INET, socket.AF_INET6]  # one ask per family, in turn
        assert p.chunks == []  # each dump read to its end
    # one namespace's second dump fails: raised here, once no reader is left
    with pytest.raises(sockdiag.SockDiagError):
        failing = [("a", Peer(v4(1) + done(), error(errno.EPERM))), ("b", Peer(done(), done()))]
        sockdiag.dump_changed(failing, 6, (socket.AF_INET, socket.AF_INET6), 0xFFF,  # type: ignore[arg-type]
                              sockdiag.ChangedRead(frozenset()))  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name == "sockdiag-read"]
