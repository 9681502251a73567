"""A child process that makes sockets for tests/kernel/test_explain_bind.py, on command
(JSON lines on stdin), in whatever namespace it runs in: each with its options set as
the given uid (the socket's owner is the uid that made it), then bound, listening,
connected or left in TIME-WAIT; and a bind() tried as a given uid, answered with the
errno it got. It holds every socket until told to close it."""

import errno
import json
import os
import socket
import struct
import sys

SO_COOKIE = 57
socks = {}
peer = {}  # the listener the connecting kinds connect to, per family


def as_uid(uid, fn):
    """fn() with this uid as the effective one (and no capabilities but for root)."""
    if uid:
        os.setegid(uid)
        os.seteuid(uid)
    try:
        return fn()
    finally:
        if uid:
            os.seteuid(0)
            os.setegid(0)


def make(c):
    fam = socket.AF_INET6 if c["family"] == 6 else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if c["protocol"] == "tcp" else socket.SOCK_DGRAM)
    if c.get("reuseaddr"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if c.get("reuseport"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(bool(c.get("v6only"))))
    if c.get("device"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, c["device"].encode())
    return s


def cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def listener(family):
    """A dual-stack listener on port 9 (IPv4 on 127.0.0.1 for an IPv4 client)."""
    if family not in peer:
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.bind(("::1" if family == 6 else "127.0.0.1", 9))
        s.listen(64)
        peer[family] = s
    return peer[family]


def hold(c):
    """A socket as spec'd; its cookie, or the errno making it met."""

    def go():
        s = make(c)
        try:
            s.bind((c["addr"], c["port"]))
            kind = c["kind"]
            if kind == "listen":
                s.listen(16)
            elif kind in ("connected", "time_wait"):
                lst = listener(c["family"])
                s.settimeout(1.0)  # a socket bound to the veth sends its SYN out there: no answer
                s.connect(("::1" if c["family"] == 6 else "127.0.0.1", 9))
                s.settimeout(None)
                if c["protocol"] == "tcp":
                    a, _ = lst.accept()
                    if kind == "time_wait":  # the active close's side keeps the port in TIME-WAIT
                        k = cookie(s)
                        s.close()
                        a.close()
                        return {"cookie": k, "time_wait": True}
                    socks[cookie(a)] = a
            k = cookie(s)
            socks[k] = s
            return {"cookie": k}
        except OSError as e:
            s.close()
            return {"errno": errno.errorcode.get(e.errno, str(e.errno))}

    return as_uid(c.get("uid", 0), go)


def try_bind(c):
    """bind() as spec'd: None if it succeeded (the socket is closed again), else the errno."""

    def go():
        s = make(c)
        try:
            s.bind((c["addr"], c["port"]))
            return {"errno": None}
        except OSError as e:
            return {"errno": errno.errorcode.get(e.errno, str(e.errno))}
        finally:
            s.close()

    return as_uid(c.get("uid", 0), go)


def close(c):
    s = socks.pop(c["cookie"], None)
    if s is None:
        return {"closed": False}
    if s.type == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: no TIME-WAIT left
    s.close()
    return {"closed": True}


def main():
    for line in sys.stdin:
        c = json.loads(line)
        if c["op"] == "quit":
            break
        out = {"hold": hold, "try_bind": try_bind, "close": close}[c["op"]](c)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
