"""Network namespaces: finding them, their identities, and sockets opened inside them.

A namespace is named by its inode (as in /proc/PID/ns/net, what people compare) and
known to BPF by its cookie (bpf_get_netns_cookie); SO_NETNS_COOKIE on a socket opened
inside it links the two. The cookie is the identity: an inode is reused as soon as a
namespace dies. Python 3.11 has no os.setns, so libc's is called directly;
setns(CLONE_NEWNET) changes only the calling thread, and the thread switches back.

Nothing here keeps a namespace alive: a namespace file descriptor, or any socket opened
inside, would (after `ip netns del`, its devices would live on). The registry remembers
where a namespace was found; a read enters it through that path (checking the cookie),
and its sock_diag socket is closed when the read ends (`reading()`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sockwatch.kernel import sockdiag, syscalls

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
_lock = threading.Lock()
T = TypeVar("T")


def _setns(fd: int) -> None:
    syscalls.setns(fd, CLONE_NEWNET)


def device_names(indexes: Iterable[int]) -> dict[int, str]:
    """ifindex -> device name in the calling thread's namespace (run it with in_netns: an
    ifindex is its namespace's); an index gone meanwhile is left out."""
    names = {}
    for i in indexes:
        with contextlib.suppress(OSError):
            names[i] = socket.if_indextoname(i)
    return names


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


def _cookie_here() -> int:
    """The cookie of the namespace this thread is in."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return netns_cookie_of(s)


def cookie_of_netns(ns_fd: int) -> int:
    """The cookie of the namespace `ns_fd` refers to."""
    return in_netns(ns_fd, _cookie_here)


class NamespaceGone(OSError):
    """The namespace a read wanted no longer exists."""


@dataclass
class Namespace:
    inode: int
    cookie: int
    path: str  # where it was last found (/run/netns/NAME or /proc/PID/ns/net); holds nothing


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
    """Every network namespace on the host we have seen, by cookie and by inode. It holds
    no file descriptor or socket between reads."""

    def __init__(self) -> None:
        self.by_inode: dict[int, Namespace] = {}
        self.by_cookie: dict[int, Namespace] = {}
        self._missed: dict[int, float] = {}  # cookie -> when a full search last failed
        self._reading: dict[int, socket.socket] | None = None  # cookie -> diag socket, during a read

    # ---- entering -------------------------------------------------------------------------

    @staticmethod
    def _diag_at(path: str, inode: int | None = None) -> tuple[int, socket.socket] | None:
        """(inode, sock_diag socket opened inside) for a namespace file, or None."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # the process or namespace went away
        try:
            found = os.fstat(fd).st_ino
            if inode is not None and found != inode:
                return None
            return found, in_netns(fd, sockdiag.open_diag_socket)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _add(self, path: str, inode: int, diag: socket.socket) -> Namespace:
        cookie = netns_cookie_of(diag)
        # If the inode was another namespace's, that one died: it stays in by_cookie until
        # check_alive() reports it, so that its rows go with it.
        ns = self.by_cookie.get(cookie)
        if ns is None:
            ns = Namespace(inode, cookie, path)
            self.by_cookie[cookie] = ns
        ns.path = path
        self.by_inode[inode] = ns
        return ns

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """One read of the kernel's tables: sock_diag sockets opened by diag() live until it ends."""
        if self._reading is not None:
            yield  # nested: the outer read closes them
            return
        self._reading = {}
        try:
            yield
        finally:
            for s in self._reading.values():
                s.close()
            self._reading = None

    def diag(self, ns: Namespace) -> socket.socket:
        """A sock_diag socket inside ns for the current read (inside reading()), or
        NamespaceGone. The namespace is entered where it was found, and the socket's
        cookie must be ns's: a path or inode may by now belong to another namespace."""
        assert self._reading is not None, "diag() is for use inside reading()"
        s = self._reading.get(ns.cookie)
        if s is not None:
            return s
        for path in itertools.chain([ns.path], self._holders_of(ns)):
            got = self._diag_at(path, ns.inode)
            if got is None:
                continue
            if netns_cookie_of(got[1]) == ns.cookie:
                ns.path = path
                self._reading[ns.cookie] = got[1]
                return got[1]
            self._add(path, *got)  # the inode is another namespace's now
            got[1].close()
        self._forget(ns)
        raise NamespaceGone(f"network namespace {ns.inode} is gone")

    def using_fd(self, ns: Namespace, fn: Callable[[int], T]) -> T:
        """fn(fd) with a descriptor of ns, closed when fn returns, or NamespaceGone. The
        file is ns's by inode and by the cookie of a socket opened inside (a path or an
        inode may by now be another namespace's). What fn raises is fn's."""
        for path in itertools.chain([ns.path], self._holders_of(ns)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    if os.fstat(fd).st_ino != ns.inode or cookie_of_netns(fd) != ns.cookie:
                        continue
                except OSError:
                    continue
                ns.path = path
                return fn(fd)
            finally:
                os.close(fd)
        raise NamespaceGone(f"network namespace {ns.inode} is gone")

    def sysctls(self, ns: Namespace, names: tuple[str, ...]) -> dict[str, str]:
        """Files of /proc/sys/net as ns sees them (opened from inside it: /proc/sys/net
        answers for the opener's namespace); NamespaceGone, or OSError from a read."""

        def read() -> dict[str, str]:
            out = {}
            for name in names:
                with open(f"/proc/sys/net/{name}") as f:
                    out[name] = f.read().strip()
            return out

        return self.using_fd(ns, lambda fd: in_netns(fd, read))

    def netstat(self, ns: Namespace) -> str:
        """/proc/net/netstat as ns counts it (the calling thread's namespace answers:
        thread-self); NamespaceGone, or OSError from the read."""

        def read() -> str:
            with open("/proc/thread-self/net/netstat") as f:
                return f.read()

        return self.using_fd(ns, lambda fd: in_netns(fd, read))

    @staticmethod
    def _holders_of(ns: Namespace) -> Iterator[str]:
        """Other places ns may still be held (searched only when where it was found
        fails): stat first, entering is the costly part."""
        for path in _candidates():
            if path == ns.path:
                continue
            try:
                if os.stat(path).st_ino == ns.inode:
                    yield path
            except OSError:
                continue

    # ---- finding --------------------------------------------------------------------------

    def _open(self, path: str) -> Namespace | None:
        got = self._diag_at(path)
        if got is None:
            return None
        inode, diag = got
        try:
            return self._add(path, inode, diag)
        finally:
            diag.close()

    def own(self) -> Namespace | None:
        """The namespace this process runs in."""
        return self._open("/proc/self/ns/net")

    def refresh(self) -> list[Namespace]:
        """Find namespaces not known yet (stat first: entering is the costly part). A
        known inode is entered again when the namespace known by it is no longer where it
        was found: inodes are reused at once, and the new namespace must not pass for the
        dead one (an event that names no process is resolved only through here)."""
        new: list[Namespace] = []
        moved: dict[int, bool] = {}  # inode -> its known namespace left the path it was found at
        for path in _candidates():
            try:
                inode = os.stat(path).st_ino
            except OSError:
                continue
            known = self.by_inode.get(inode)
            if known is not None and path != known.path:
                if inode not in moved:
                    try:
                        moved[inode] = os.stat(known.path).st_ino != inode
                    except OSError:
                        moved[inode] = True
                if not moved[inode]:
                    continue
            elif known is not None:
                continue
            ns = self._open(path)
            if ns is not None:
                moved[inode] = False  # what the inode names now was found here
                if ns is not known:
                    new.append(ns)
        return new

    def resolve_cookie(self, cookie: int, pid: int | None = None) -> Namespace | None:
        ns = self.by_cookie.get(cookie)
        if ns is None and pid:
            # usually the namespace of the process the event names (an unknown cookie is a
            # namespace we have not entered yet, even if its inode is known: inodes are reused)
            ns = self._open(f"/proc/{pid}/ns/net")
            if ns is not None and ns.cookie != cookie:
                ns = None
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

    def _forget(self, ns: Namespace) -> None:
        self.by_cookie.pop(ns.cookie, None)
        if self.by_inode.get(ns.inode) is ns:
            del self.by_inode[ns.inode]

    def check_alive(self) -> list[Namespace]:
        """Forget, and return, namespaces that died since they were found: one stat of
        where each was found (entering only if that path is gone). Inodes are reused at
        once, so a dead namespace's rows must go before a new one takes its number."""
        gone = []
        for ns in list(self.by_cookie.values()):
            if self.by_inode.get(ns.inode) is ns:
                try:
                    if os.stat(ns.path).st_ino == ns.inode:
                        continue
                except OSError:
                    pass
                with self.reading():
                    try:
                        self.diag(ns)  # held elsewhere (its first process exited)?
                        continue
                    except NamespaceGone:
                        pass  # diag() forgot it
            else:
                self.by_cookie.pop(ns.cookie, None)  # its inode is another namespace's now
            gone.append(ns)
        return gone
