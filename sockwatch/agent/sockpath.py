"""Where the agent answers: a unix socket path checked before anything touches it.

The agent runs as root, so a careless path could clobber someone else's file or socket,
or loosen or tighten a shared directory. The rules:
- the path must be absolute, fit AF_UNIX (107 bytes), and not be under /proc, /sys, /dev;
- missing directories are created 0700 and are the only ones removed again; an existing
  directory keeps its mode;
- a lock file beside the socket (PATH.lock, ours: root-owned, a pid in it) says whether an
  agent serves there; only a socket left by a dead agent (its lock file is there and free)
  is replaced. Anything else at PATH (a file, a directory, another program's socket, live
  or not) is refused and left alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
from dataclasses import dataclass, field

MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL
_FORBIDDEN = ("/proc", "/sys", "/dev")
_LOCK_CONTENT = re.compile(rb"[0-9]{0,10}\n?")


class PathError(ValueError):
    """The socket path cannot be used; the message says why and leaves the path alone."""


class ListenError(PathError):
    """The metrics address cannot be listened on (in use, or not this host's)."""


class AgentRunning(RuntimeError):
    pass


class PathUnusable(RuntimeError):
    """The filesystem refused what serving there needs (full, read-only): nothing of ours
    is left behind."""


def _unusable(what: str, e: OSError) -> PathUnusable:
    return PathUnusable(f"cannot {what}: {e.strerror or e}")


def _kernels_tree(path: str) -> str | None:
    """The kernel's tree (/proc, /sys, /dev) a normalised path is in, if any."""
    return next((root for root in _FORBIDDEN if path == root or path.startswith(root + "/")), None)


def _show(path: str) -> str:
    return repr(path) if len(path) <= 80 else repr(path[:80]) + "..."


def validate(path: str) -> str:
    """The normalised path, or PathError. Touches nothing."""
    if not path:
        raise PathError("the socket path is empty")
    if "\0" in path:
        raise PathError("the socket path contains a NUL byte")
    if not path.startswith("/"):
        raise PathError(f"the socket path {_show(path)} is relative: give an absolute path")
    if path.endswith("/"):
        raise PathError(f"the socket path {_show(path)} names a directory: add a file name")
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if root := _kernels_tree(norm):
        raise PathError(f"the socket path {_show(path)} is under {root}, which is the kernel's")
    try:
        size = len(os.fsencode(norm))
    except UnicodeEncodeError:
        raise PathError(f"the socket path {_show(path)} is not valid text for a file name") from None
    if size > MAX_UNIX_PATH:
        raise PathError(f"the socket path is {size} bytes long; a unix socket path is at most {MAX_UNIX_PATH}")
    return norm


def _check_parents(path: str) -> None:
    """The directories above `path` as the kernel will walk them: a symlink among them
    must be root's (anyone else's could lead root anywhere: /var/run -> /run is root's),
    and where they lead must not be the kernel's trees either. PathError if not."""
    cur = "/"
    for part in os.path.dirname(path).strip("/").split("/"):
        if not part:
            continue
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            break  # the rest is missing: made by us, as directories
        except OSError as e:
            raise PathError(f"{_show(cur)} cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode) and st.st_uid != 0:
            raise PathError(f"{_show(cur)} is a symlink owned by uid {st.st_uid}, not root: it is not followed")
    if root := _kernels_tree(os.path.realpath(os.path.dirname(path))):
        raise PathError(f"the socket path {_show(path)} leads under {root} (through a symlink), "
                        "which is the kernel's")  # fmt: skip


def _make_dirs(d: str) -> list[str]:
    """Create what is missing of d (0700), deepest last; return what was created."""
    missing = []
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise PathError(f"{_show(d)} is not a directory")
    created: list[str] = []
    for m in reversed(missing):
        try:
            os.mkdir(m, 0o700)
        except FileExistsError:
            pass  # made meanwhile by someone else: not ours to remove
        except OSError as e:  # no space, no inodes, read-only
            _remove_dirs(created)
            raise _unusable(f"create the directory {_show(m)}", e) from None
        else:
            created.append(m)
    for m in missing:
        if not os.path.isdir(m):
            raise PathError(f"{_show(m)} is not a directory")
    return created


def _open_lock(lock_path: str) -> tuple[int, bool]:
    """(fd, created): our lock file, or PathError if something else has that name."""
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), True
    except FileExistsError:
        pass
    except OSError as e:  # no space, no inodes, read-only
        raise _unusable(f"create the lock file {_show(lock_path)}", e) from None
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise PathError(f"{_show(lock_path)} exists and is not sockwatch's lock file ({e.strerror})") from None
    st = os.fstat(fd)
    if (
        not stat.S_ISREG(st.st_mode)
        or st.st_uid != 0
        or st.st_size > 16
        or not _LOCK_CONTENT.fullmatch(os.pread(fd, 17, 0))
    ):
        os.close(fd)
        raise PathError(f"{_show(lock_path)} exists and is not sockwatch's lock file: it was left alone")
    return fd, False


def _live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(1)
    try:
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # someone's, in a state we cannot judge: leave it
    finally:
        s.close()


@dataclass
class Claim:
    """The socket path, held: the listening socket, the lock, and what we created."""

    path: str
    listener: socket.socket
    lock_fd: int
    created_dirs: list[str] = field(default_factory=list)
    ino: tuple[int, int] = (0, 0)

    def release(self) -> None:
        """Remove what is ours (socket, lock file, directories we made) and nothing else."""
        self.listener.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.lock_fd >= 0:
            # holding the lock: no agent can be starting on this path right now
            try:
                os.unlink(self.path + ".lock")
            except FileNotFoundError:
                pass
            os.close(self.lock_fd)
            self.lock_fd = -1
        _remove_dirs(self.created_dirs)


def claim(path: str) -> Claim:
    """Bind the agent's socket at path (validated), or raise PathError / AgentRunning /
    PathUnusable, leaving nothing of ours behind."""
    path = validate(path)
    _check_parents(path)
    created = _make_dirs(os.path.dirname(path))
    try:
        _check_parents(path)  # again: a directory someone made in our place meanwhile may be a link
    except BaseException:
        _remove_dirs(created)
        raise
    lock_path = path + ".lock"
    try:
        lock_fd, created_lock = _open_lock(lock_path)
    except BaseException:
        _remove_dirs(created)
        raise
    locked = False
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.pread(lock_fd, 16, 0).decode(errors="replace").strip() or "?"
                raise AgentRunning(f"another sockwatch agent (pid {holder}) is serving {path}") from None
            raise
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise PathError(f"{_show(path)} exists and is not a socket: it was left alone")
            if _live(path):
                raise PathError(f"{_show(path)} is another program's live socket: it was left alone")
            if created_lock:
                raise PathError(
                    f"{_show(path)} is a socket nobody listens on, with no sockwatch lock beside it: "
                    "remove it if it is yours"
                )
            os.unlink(path)  # left by an agent that died: its lock file is here and free
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # no space for one line
            raise _unusable(f"write the lock file {_show(lock_path)}", e) from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(path)
        except OSError as e:  # no inode left, read-only
            s.close()
            raise _unusable(f"create the socket {_show(path)}", e) from None
        except BaseException:
            s.close()
            raise
        finally:
            os.umask(old)
        st = os.lstat(path)
        s.listen(64)
        s.setblocking(False)
        return Claim(path, s, lock_fd, created, (st.st_dev, st.st_ino))
    except BaseException:
        if locked and created_lock:
            os.unlink(lock_path)  # ours and still locked by us: nobody else uses it
        os.close(lock_fd)
        _remove_dirs(created)
        raise


def _remove_dirs(created: list[str]) -> None:
    """Remove the directories we made, deepest first, while they are empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break
