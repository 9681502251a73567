"""Network namespaces: finding them, their identities, and sockets opened inside them.

A namespace is named by its inode (as in /proc/PID/ns/net, what people compare) and
known to BPF by its cookie (bpf_get_netns_cookie); SO_NETNS_COOKIE on a socket opened
inside it links the two. Python 3.11 has no os.setns, so libc's is called directly;
setns(CLONE_NEWNET) changes only the calling thread, and the thread switches back.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sockwatch.kernel import sockdiag

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def in_netns(ns_fd: int, fn: Callable[[], T]) -> T:
    """Run fn with this thread inside the namespace of ns_fd, then come back."""
    with _lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(ns_fd)
            try:
                return fn()
            finally:
                _setns(home)
        finally:
            os.close(home)


def netns_cookie_of(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@dataclass
class Namespace:
    inode: int
    cookie: int
    fd: int  # keeps the namespace alive and enterable while we know it
    diag: socket.socket  # sock_diag socket opened inside it

    def close(self) -> None:
        self.diag.close()
        os.close(self.fd)


def _candidates() -> Iterator[str]:
    """Paths of namespace files: ip-netns names (which may hold no process) and processes'."""
    try:
        for name in sorted(os.listdir("/run/netns")):
            yield f"/run/netns/{name}"
    except OSError:
        pass
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            yield f"/proc/{pid}/ns/net"


class NamespaceRegistry:
    """Every network namespace on the host we have seen, by inode and by cookie."""

    def __init__(self) -> None:
        self.by_inode: dict[int, Namespace] = {}
        self.by_cookie: dict[int, Namespace] = {}
        self._missed: dict[int, float] = {}  # cookie -> when a full search last failed
        self._seen: set[int] | None = None  # inodes the last refresh found on the host

    def _open(self, path: str) -> Namespace | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # the process or namespace went away
        try:
            inode = os.fstat(fd).st_ino
            if inode in self.by_inode:
                os.close(fd)
                return self.by_inode[inode]
            diag = in_netns(fd, sockdiag.open_diag_socket)
            ns = Namespace(inode=inode, cookie=netns_cookie_of(diag), fd=fd, diag=diag)
        except OSError:
            os.close(fd)
            return None
        self.by_inode[inode] = ns
        self.by_cookie[ns.cookie] = ns
        if self._seen is not None:
            self._seen.add(inode)  # found alive now, even if after the last scan
        return ns

    def refresh(self) -> list[Namespace]:
        """Find namespaces not known yet (stat first: entering is the costly part)."""
        new: list[Namespace] = []
        seen: set[int] = set()
        for path in _candidates():
            try:
                inode = os.stat(path).st_ino
            except OSError:
                continue
            seen.add(inode)
            if inode not in self.by_inode:
                ns = self._open(path)
                if ns is not None:
                    new.append(ns)
        self._seen = seen
        return new

    def for_pid(self, pid: int) -> Namespace | None:
        """The namespace of a process: how a cookie from a hook is usually resolved."""
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        return self.by_inode.get(inode) or self._open(f"/proc/{pid}/ns/net")

    def resolve_cookie(self, cookie: int, pid: int | None = None) -> Namespace | None:
        ns = self.by_cookie.get(cookie)
        if ns is None and pid:
            cand = self.for_pid(pid)
            if cand is not None and cand.cookie == cookie:
                ns = cand
        if ns is None:
            # a full search scans /proc: at most once a second for a cookie nobody has
            now = time.monotonic()
            if now - self._missed.get(cookie, -10.0) < 1.0:
                return None
            self.refresh()
            ns = self.by_cookie.get(cookie)
            if ns is None:
                if len(self._missed) > 4096:
                    self._missed.clear()
                self._missed[cookie] = now
        return ns

    def prune(self) -> list[Namespace]:
        """Forget namespaces the last refresh() found nothing else holding (we hold an fd,
        so they would otherwise live on); reuses that scan rather than walking /proc again."""
        gone: list[Namespace] = []
        live = self._seen
        if live is None:
            return gone
        for inode, ns in list(self.by_inode.items()):
            if inode not in live:
                gone.append(ns)
                del self.by_inode[inode]
                self.by_cookie.pop(ns.cookie, None)
                ns.close()
        return gone

    def close(self) -> None:
        for ns in self.by_inode.values():
            ns.close()
        self.by_inode.clear()
        self.by_cookie.clear()
