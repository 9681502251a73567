"""Holds N TCP sockets (both ends of N/2 loopback connections to its own listener) until
stdin closes. Run inside the benchmark's namespace: bench/bench_snapshot.py starts it."""

import resource
import socket
import sys


def main() -> None:
    n, port, addr = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((addr, port))
    lst.listen(4096)
    held = [lst]
    for _ in range(n // 2):
        c = socket.create_connection((addr, port))
        a, _ = lst.accept()
        held += (c, a)
    sys.stdout.write(f"{len(held)}\n")
    sys.stdout.flush()
    sys.stdin.read()


if __name__ == "__main__":
    main()
