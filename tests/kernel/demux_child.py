"""A test child for tests/kernel/test_explain.py, run inside a namespace: it opens the
sockets it is told to (keeping those the kernel accepts), then for each packet it is
told to send, says which of its sockets received it. JSON lines on stdin and stdout."""

import json
import os
import select
import socket
import sys

SO_COOKIE = 57


def make(spec):
    fam = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if spec["proto"] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    if spec.get("reuseport"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if spec.get("reuseaddr"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.get("v6only", False)))
    if spec.get("dev"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, spec["dev"].encode())
    try:
        s.bind((spec["addr"], spec["port"]))
        if spec.get("peer"):
            s.connect(tuple(spec["peer"]))
        if spec["proto"] == "tcp":
            s.listen(16)
    except OSError as e:
        s.close()
        return None, e.errno
    s.setblocking(False)
    return s, 0


def received(socks, proto):
    """Which sockets got something, each drained (a datagram read, a connection accepted)."""
    got = []
    ready, _, _ = select.select(list(socks.values()), [], [], 1.0)
    for cookie, s in socks.items():
        if s not in ready:
            continue
        try:
            if proto == "tcp":
                c, _ = s.accept()
                c.close()
            else:
                s.recv(2048)
            got.append(cookie)
        except BlockingIOError:
            pass
    return got


def main():
    socks = {"tcp": {}, "udp": {}}
    for line in sys.stdin:
        c = json.loads(line)
        if c["op"] == "open":
            out = []
            for spec in c["socks"]:
                s, err = make(spec)
                if s is not None:
                    cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
                    socks[spec["proto"]][cookie] = s
                out.append({"cookie": cookie if s is not None else None, "errno": err})
            print(json.dumps(out), flush=True)
        elif c["op"] == "send":
            fam = socket.AF_INET6 if ":" in c["dst"] else socket.AF_INET
            kind = socket.SOCK_STREAM if c["proto"] == "tcp" else socket.SOCK_DGRAM
            with socket.socket(fam, kind) as s:
                s.bind((c["src"], c["sport"]))
                if c["proto"] == "tcp":
                    s.settimeout(2)
                    try:
                        s.connect((c["dst"], c["dport"]))
                    except OSError as e:
                        print(json.dumps({"got": [], "errno": e.errno}), flush=True)
                        continue
                else:
                    s.sendto(b"x", (c["dst"], c["dport"]))
                print(json.dumps({"got": received(socks[c["proto"]], c["proto"]), "errno": 0}), flush=True)
        elif c["op"] == "pid":
            print(json.dumps({"pid": os.getpid()}), flush=True)
        elif c["op"] == "quit":
            return


main()
