"""Socket owners from one scan of /proc/*/fd (what ss -p does), for sockets that were
open before the hooks were attached or that the hooks could not attribute."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Owner:
    pid: int
    comm: str
    fd: int = -1  # one of its descriptors for the socket


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode(errors="replace")
    except OSError:
        return "?"


def process_name(pid: int) -> str | None:
    """The process's name as ss prints it (its main thread's comm), or None if it has
    exited (a zombie holds no files any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    open_, close = stat.find(b"("), stat.rfind(b")")
    if open_ < 0 or close < 0 or stat[close + 2 : close + 3] in (b"Z", b"X"):
        return None
    return stat[open_ + 1 : close].decode(errors="replace")


def socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets a process holds open now; None if it has exited."""
    fd_dir = f"/proc/{pid}/fd/"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    out = set()
    for fd in fds:
        try:
            target = os.readlink(fd_dir + fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def scan(wanted: set[int] | None = None) -> dict[int, Owner]:
    """Socket inode -> the first process (lowest pid) holding a file for it.

    With `wanted`, stops as soon as every wanted inode is found.
    """
    owners: dict[int, Owner] = {}
    readlink = os.readlink
    pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
    remaining = set(wanted) if wanted is not None else None
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or a kernel thread
        proc: Owner | None = None
        for fd in fds:
            try:
                target = readlink(fd_dir + fd)
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            ino = int(target[8:-1])
            if ino in owners or (remaining is not None and ino not in remaining):
                continue
            if proc is None:
                proc = Owner(int(pid), _comm(pid))
            owners[ino] = Owner(proc.pid, proc.comm, int(fd))
            if remaining is not None:
                remaining.discard(ino)
                if not remaining:
                    return owners
    return owners
