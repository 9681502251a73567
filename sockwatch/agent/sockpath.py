"""Where the agent answers: a unix socket path checked before anything touches it.

The agent runs as root, so a careless path could clobber someone else's file or socket,
or loosen or tighten a shared directory. The rules:
- the path must be absolute, fit AF_UNIX (107 bytes), and not be under /proc, /sys, /dev;
- the directory is walked one component at a time (openat with O_NOFOLLOW), as root's
  own lookup would: a symlink is followed only if root owns it, no directory on the way
  may be another user's or writable by others without the sticky bit (its owner could
  swap what is under it), and everything after the walk (lock, socket, removal) is done
  relative to the directory it opened, so a component swapped meanwhile changes nothing;
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
from collections import namedtuple

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


MAX_LINKS = 40  # as the kernel's own path walk
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# A directory the walk created: removed again only if it is still that one. (Plain
# classes here: the client imports this module on every run, and dataclasses cost ~7 ms.)
Made = namedtuple("Made", "path dev ino")


class _Dir:
    """The socket's directory, held open: everything after the walk is done relative to
    this fd, so nothing can swap a component of the path in between."""

    def __init__(self, fd: int, real: str, created: list[Made]) -> None:
        self.fd = fd
        self.real = real  # where it is, symlinks resolved
        self.created = created  # what the walk made, outermost first


def _open_dir(path: str) -> _Dir:
    """Walk to the directory of `path` as the kernel would, one component at a time with
    openat(O_NOFOLLOW), creating what is missing (0700). A symlink is followed only if
    root owns it; no directory on the way may be another user's or writable by others
    without the sticky bit (its owner could swap what is under it); the walk never
    enters /proc, /sys or /dev. PathError or PathUnusable, with what it made removed."""
    todo = [p for p in os.path.dirname(path).split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    real: list[str] = []
    created: list[Made] = []
    links = 0
    try:
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":  # (only from a symlink's target: validate() normalised the path)
                real = real[:-1]
                os.close(fd)
                fd = _reopen(real)
                continue
            where = "/" + "/".join([*real, part])
            try:
                st = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    todo.insert(0, part)  # made meanwhile by someone else: looked at again, not ours
                    continue
                except OSError as e:  # no space, no inodes, read-only
                    raise _unusable(f"create the directory {_show(where)}", e) from None
                st = os.lstat(part, dir_fd=fd)
                created.append(Made(where, st.st_dev, st.st_ino))
            except OSError as e:
                raise PathError(f"{_show(where)} cannot be read ({e.strerror})") from None
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid != 0:
                    raise PathError(
                        f"{_show(where)} is a symlink owned by uid {st.st_uid}, not root: it is not followed"
                    )
                links += 1
                if links > MAX_LINKS:
                    raise PathError(f"{_show(path)} has too many symlinks on the way")
                target = os.readlink(part, dir_fd=fd)
                todo = [p for p in target.split("/") if p] + todo
                if target.startswith("/"):
                    real = []
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise PathError(f"{_show(where)} is not a directory")
            if root := _kernels_tree(where):
                raise PathError(f"the socket path {_show(path)} leads under {root} (through a symlink), "
                                "which is the kernel's")  # fmt: skip
            _check_dir(where, st)
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            got = os.fstat(nfd)
            if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
                os.close(nfd)
                raise PathError(f"{_show(where)} changed while it was looked at: try again")
            os.close(fd)
            fd = nfd
            real.append(part)
        return _Dir(fd, "/" + "/".join(real), created)
    except BaseException:
        os.close(fd)
        _remove_dirs(created)
        raise


def _reopen(real: list[str]) -> int:
    """A directory already walked (and checked), opened again from the root."""
    fd = os.open("/", _DIR_FLAGS)
    for part in real:
        nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _check_dir(where: str, st: os.stat_result) -> None:
    if st.st_uid != 0:
        raise PathError(f"{_show(where)} is owned by uid {st.st_uid}, not root: its owner could swap what is "
                        "under it")  # fmt: skip
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise PathError(f"{_show(where)} is writable by others without the sticky bit: anyone could swap what "
                        "is under it")  # fmt: skip


def _open_lock(d: _Dir, name: str, shown: str) -> tuple[int, bool]:
    """(fd, created): our lock file `name` in d, or PathError if something else has that name."""
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, 0o600, dir_fd=d.fd), True
    except FileExistsError:
        pass
    except OSError as e:  # no space, no inodes, read-only
        raise _unusable(f"create the lock file {_show(shown)}", e) from None
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=d.fd)
    except OSError as e:
        raise PathError(f"{_show(shown)} exists and is not sockwatch's lock file ({e.strerror})") from None
    st = os.fstat(fd)
    if (
        not stat.S_ISREG(st.st_mode)
        or st.st_uid != 0
        or st.st_size > 16
        or not _LOCK_CONTENT.fullmatch(os.pread(fd, 17, 0))
    ):
        os.close(fd)
        raise PathError(f"{_show(shown)} exists and is not sockwatch's lock file: it was left alone")
    return fd, False


def _in(d: _Dir, name: str) -> str:
    """A path to `name` in d through d's fd (the kernel resolves /proc/self/fd/N to the
    directory held, not to whatever its old path names now): for bind and connect,
    which take no directory fd."""
    via = f"/proc/self/fd/{d.fd}/{name}"
    if len(os.fsencode(via)) > MAX_UNIX_PATH:
        raise PathError(f"the socket's file name {_show(name)} is too long for a unix socket")
    return via


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


class Claim:
    """The socket path, held: the listening socket, the lock, the directory (open), and
    what we created."""

    def __init__(self, path: str, listener: socket.socket, lock_fd: int, created_dirs: list[Made],
                 ino: tuple[int, int], dir_fd: int) -> None:  # fmt: skip
        self.path = path
        self.listener = listener
        self.lock_fd = lock_fd
        self.created_dirs = created_dirs
        self.ino = ino
        self.dir_fd = dir_fd

    def release(self) -> None:
        """Remove what is ours (socket, lock file, directories we made) and nothing else."""
        self.listener.close()
        name = os.path.basename(self.path)
        if self.dir_fd >= 0:
            try:
                st = os.lstat(name, dir_fd=self.dir_fd)
                if (st.st_dev, st.st_ino) == self.ino:
                    os.unlink(name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            if self.lock_fd >= 0:
                # holding the lock: no agent can be starting on this path right now
                try:
                    os.unlink(name + ".lock", dir_fd=self.dir_fd)
                except FileNotFoundError:
                    pass
            os.close(self.dir_fd)
            self.dir_fd = -1
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        _remove_dirs(self.created_dirs)


def claim(path: str) -> Claim:
    """Bind the agent's socket at path (validated), or raise PathError / AgentRunning /
    PathUnusable, leaving nothing of ours behind. Every step after the directory walk is
    relative to the directory it opened."""
    path = validate(path)
    name = os.path.basename(path)
    d = _open_dir(path)
    lock_path = path + ".lock"
    try:
        lock_fd, created_lock = _open_lock(d, name + ".lock", lock_path)
    except BaseException:
        os.close(d.fd)
        _remove_dirs(d.created)
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
            st = os.lstat(name, dir_fd=d.fd)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise PathError(f"{_show(path)} exists and is not a socket: it was left alone")
            if _live(_in(d, name)):
                raise PathError(f"{_show(path)} is another program's live socket: it was left alone")
            if created_lock:
                raise PathError(
                    f"{_show(path)} is a socket nobody listens on, with no sockwatch lock beside it: "
                    "remove it if it is yours"
                )
            os.unlink(name, dir_fd=d.fd)  # left by an agent that died: its lock file is here and free
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # no space for one line
            raise _unusable(f"write the lock file {_show(lock_path)}", e) from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(_in(d, name))
        except OSError as e:  # no inode left, read-only
            s.close()
            raise _unusable(f"create the socket {_show(path)}", e) from None
        except BaseException:
            s.close()
            raise
        finally:
            os.umask(old)
        st = os.lstat(name, dir_fd=d.fd)
        s.listen(64)
        s.setblocking(False)
        return Claim(path, s, lock_fd, d.created, (st.st_dev, st.st_ino), d.fd)
    except BaseException:
        if locked and created_lock:
            os.unlink(name + ".lock", dir_fd=d.fd)  # ours and still locked by us: nobody else uses it
        os.close(lock_fd)
        os.close(d.fd)
        _remove_dirs(d.created)
        raise


def _remove_dirs(created: list[Made]) -> None:
    """Remove the directories we made, deepest first, while they are empty and still
    the ones we made (not another directory put in their place)."""
    for m in reversed(created):
        try:
            st = os.lstat(m.path)
            if (st.st_dev, st.st_ino) != (m.dev, m.ino):
                break
            os.rmdir(m.path)
        except OSError:
            break
