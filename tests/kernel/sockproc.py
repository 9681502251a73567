"""A child process that opens real sockets when told to (JSON lines on stdin) and
answers with what the kernel gave it (cookie, inode, local and remote ends).

Run as `python3 sockproc.py`, possibly under `ip netns exec NAME`. It keeps every
socket open until told to close it, so the test can compare views at leisure.
"""

import json
import os
import resource
import socket
import struct
import sys

SO_COOKIE = 57
IP_BIND_ADDRESS_NO_PORT = 24
socks: dict[int, socket.socket] = {}


def fam(f):
    return socket.AF_INET6 if f == 6 else socket.AF_INET


def info(i, s):
    cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    ino = os.fstat(s.fileno()).st_ino
    local = s.getsockname()
    try:
        remote = s.getpeername()
    except OSError:
        remote = None
    return {
        "id": i,
        "cookie": cookie,
        "inode": ino,
        "local": list(local[:2]),
        "remote": list(remote[:2]) if remote else None,
    }


def keep(s):
    i = len(socks) + 1
    while i in socks:
        i += 1
    socks[i] = s
    return i


def handle(c):
    op = c["op"]
    if op == "tcp_listen":
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if c.get("reuseport"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if "v6only" in c:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(c["v6only"]))
        if c.get("bind", True):
            s.bind((c["addr"], c.get("port", 0)))
        s.listen(128)
        return info(keep(s), s)
    if op == "tcp_connect":
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_STREAM)
        if c.get("no_port_bind"):
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((c["bind_addr"], 0))
        s.connect((c["addr"], c["port"]))
        out = info(keep(s), s)
        if "accept_on" in c:
            a, _ = socks[c["accept_on"]].accept()
            out["accepted"] = info(keep(a), a)
        return out
    if op == "udp_bind":
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_DGRAM)
        if c.get("reuseport"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if c.get("reuseaddr"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if "v6only" in c:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(c["v6only"]))
        if c.get("rcvbuf"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, c["rcvbuf"])
        s.bind((c["addr"], c.get("port", 0)))
        return info(keep(s), s)
    if op == "udp_flood":  # n datagrams from one socket (made and closed here)
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_DGRAM)
        for _ in range(c["n"]):
            s.sendto(b"x" * c.get("size", 100), (c["addr"], c["port"]))
        s.close()
        return {"sent": c["n"]}
    if op == "udp_connect":
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_DGRAM)
        if "bind_addr" in c:
            s.bind((c["bind_addr"], c.get("bind_port", 0)))
        s.connect((c["addr"], c["port"]))
        return info(keep(s), s)
    if op == "udp_sendto":
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_DGRAM)
        s.sendto(b"sockwatch", (c["addr"], c["port"]))
        return info(keep(s), s)
    if op == "tcp_bind":
        s = socket.socket(fam(c.get("family", 4)), socket.SOCK_STREAM)
        try:
            if c.get("reuseaddr"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((c["addr"], c.get("port", 0)))
        except OSError:
            s.close()
            raise
        return info(keep(s), s)
    if op == "send":
        socks[c["id"]].sendall(b"s" * c["n"])
        return {"sent": c["n"]}
    if op == "recv":
        got = 0
        while got < c["n"]:
            chunk = socks[c["id"]].recv(c["n"] - got)
            if not chunk:
                break
            got += len(chunk)
        return {"received": got}
    if op == "burst":  # UDP sockets bound and closed as fast as Python can
        for _ in range(c["n"]):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.close()
        return {"done": c["n"]}
    if op == "close":
        s = socks.pop(c["id"])
        if c.get("rst"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return {"closed": c["id"]}
    if op == "pid":
        return {"pid": os.getpid()}
    raise ValueError(f"unknown op {op}")


def main():
    # tests hold thousands of sockets; a login's soft limit (often 1024) is not the test's
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for line in sys.stdin:
        c = json.loads(line)
        if c["op"] == "quit":
            break
        try:
            out = handle(c)
        except OSError as e:
            out = {"error": e.strerror, "errno": e.errno}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
