"""Socket options sock_diag does not report (SO_REUSEPORT, SO_REUSEADDR), read from the
socket itself: a duplicate of its owner's descriptor (pidfd_getfd, Linux 5.6; the same
permission as ptrace), one getsockopt each, closed at once. Only reads; the socket is
never changed, and a socket whose inode is not the one asked for is not read."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from sockwatch.kernel import syscalls

SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)


@dataclass(frozen=True)
class Reuse:
    reuseport: bool
    reuseaddr: bool


def peek(pid: int, fd: int, inode: int) -> Reuse | None:
    """The reuse options of the socket `inode`, held by `pid` as `fd`; None if it cannot
    be read (the process or descriptor went, or no permission)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        try:
            dup = syscalls.syscall("pidfd_getfd", pidfd, fd, 0)
        except OSError:
            return None
        try:
            if os.fstat(dup).st_ino != inode:
                return None  # the descriptor was reused for something else meanwhile
            s = socket.socket(fileno=dup)
            try:
                return Reuse(bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)),
                             bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)))  # fmt: skip
            except OSError:
                return None
            finally:
                s.detach()  # the descriptor is closed below, once
        finally:
            os.close(dup)
    finally:
        os.close(pidfd)
