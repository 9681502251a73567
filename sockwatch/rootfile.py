"""Reading a file root is told to trust (serve's --config and --web-config): a regular
file no one but root (or the caller) can write, not reached through a symlink, read
without blocking (a FIFO would hang the read forever) and at most `max_bytes`."""

from __future__ import annotations

import os
import stat

from sockwatch.filters import shown


def read(path: str, what: str, max_bytes: int, error: type[Exception]) -> bytes:
    """The file's bytes; `error` with one sentence naming `what` if it is not one to trust."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symlink (O_NOFOLLOW)
            raise error(f"the {what} {shown(path)} is a symlink: give the file itself") from None
        raise error(f"cannot read the {what} {shown(path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"the {what} {shown(path)} is not a regular file")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
            raise error(f"the {what} {shown(path)} can be written by others than root: chmod go-w, chown root")
        raw = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise error(f"the {what} {shown(path)} is over {max_bytes // 1024} KiB")
    return raw
