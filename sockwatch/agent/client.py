"""Asking a running agent. Kept import-light: `snapshot --json` against an agent must
start, ask and stream the answer in a fraction of what ss takes.

What answers is checked before it is believed: the peer must be root (SO_PEERCRED), the
header must parse, and callers turn any malformed body into one clear error. A path given
with --socket must be a live agent's socket; only the default path falls back to reading
the kernel directly when no agent runs there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator

from sockwatch import __version__
from sockwatch.agent import sockpath
from sockwatch.agent.protocol import DEFAULT_SOCKET, MAX_HEADER, ProtocolError, encode_request, parse_header
from sockwatch.schema import SCHEMA_VERSION

ANSWER_TIMEOUT = 120.0  # seconds without a byte from the agent before giving up


class AgentError(RuntimeError):
    pass


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a socket"


def _connect(path: str | None, timeout: float = ANSWER_TIMEOUT) -> socket.socket | None:
    """A connection to a verified agent; None when the default path has no agent."""
    explicit = path is not None
    where = path if path is not None else DEFAULT_SOCKET
    if explicit:
        try:
            where = sockpath.validate(where)
        except sockpath.PathError as e:
            raise AgentError(str(e)) from None
        try:
            mode = os.stat(where).st_mode
        except FileNotFoundError:
            raise AgentError(f"there is no agent socket at {where}") from None
        except PermissionError:
            raise AgentError(f"the agent socket {where} is root-only: run with sudo") from None
        if not stat.S_ISSOCK(mode):
            raise AgentError(f"{where} is {_kind(mode)}, not an agent's socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(where)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        s.close()
        if explicit:
            raise AgentError(f"no sockwatch agent is listening on {where}") from None
        return None  # no agent: callers fall back to standalone
    except PermissionError:
        s.close()
        raise AgentError(f"the agent socket {where} is root-only: run with sudo") from None
    except OSError as e:
        s.close()
        raise AgentError(f"cannot reach the agent at {where}: {e.strerror}") from None
    uid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    if uid != 0:
        s.close()
        raise AgentError(f"{where} is served by uid {uid}, not root: that is not a sockwatch agent to trust")
    return s


def _read_header(s: socket.socket) -> tuple[dict, bytes]:
    buf = b""
    while b"\n" not in buf:
        if len(buf) > MAX_HEADER:
            raise AgentError("the agent's answer is malformed: its header has no end")
        chunk = s.recv(65536)
        if not chunk:
            raise AgentError("the agent closed the connection without answering")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    try:
        header = parse_header(line)
    except ProtocolError as e:
        raise AgentError(str(e)) from None
    if header.get("schema_version") != SCHEMA_VERSION:
        theirs = str(header.get("agent_version") or "before 0.1.0")[:40]
        raise AgentError(f"the agent (sockwatch {theirs!r}) answers in another JSON schema than this "
                         f"sockwatch ({__version__}): restart the agent with this version")  # fmt: skip
    if not header["ok"]:
        raise AgentError(f"the agent refused the request: {header['error'][:300]!r}")
    return header, rest


@contextlib.contextmanager
def _asking(
    op: str, path: str | None, args: dict, timeout: float = ANSWER_TIMEOUT
) -> Iterator[tuple[socket.socket, dict, bytes] | None]:
    """(connection, header, start of the body), or None when no agent runs at the
    default path; transport failures become one AgentError."""
    s = _connect(path, timeout)
    if s is None:
        yield None
        return
    try:
        with s:
            s.sendall(encode_request(op, **args))
            header, body = _read_header(s)
            yield s, header, body
    except TimeoutError:
        raise AgentError(f"the agent did not answer within {timeout:.0f}s") from None
    except BrokenPipeError:
        raise  # our own reader went away (| head): the CLI handles it
    except OSError as e:
        raise AgentError(f"the connection to the agent failed: {e.strerror or e}") from None


def request(
    op: str, path: str | None = None, timeout: float = ANSWER_TIMEOUT, **args: object
) -> tuple[dict, bytes] | None:
    """(header, body) from the agent, or None when no agent runs at the default path."""
    with _asking(op, path, args, timeout) as asked:
        if asked is None:
            return None
        s, header, body = asked
        chunks = [body]
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    return header, b"".join(chunks)


def stream(
    op: str,
    out_fd: int,
    path: str | None = None,
    timeout: float | None = ANSWER_TIMEOUT,
    on_header: Callable[[dict], None] | None = None,
    **args: object,
) -> dict | None:
    """Copy the agent's answer straight to out_fd (no parsing: the peer is a root agent,
    and its body is JSON with every string escaped) until the agent ends it: a snapshot,
    or an event subscription (timeout None: a quiet host may send nothing for long).
    None: no agent at the default path. on_header: told when an answer has come and
    before anything is written."""
    with _asking(op, path, args) as asked:
        if asked is None:
            return None
        s, header, body = asked
        if on_header is not None:
            on_header(header)
        s.settimeout(timeout)
        write_all(out_fd, body)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := s.recv_into(buf):
            write_all(out_fd, view[:n])
    return header


def stream_snapshot(
    out_fd: int, path: str | None, filters: dict, on_header: Callable[[dict], None] | None = None
) -> dict | None:
    """`snapshot --json` from the agent: the document's head (schema_version, its
    timestamp, what it may lack), the agent's array of sockets as it comes, the end.
    None: no agent at the default path (nothing written)."""
    from sockwatch.schema import SNAPSHOT_END, snapshot_head

    def begin(header: dict) -> None:
        if on_header is not None:
            on_header(header)
        write_all(out_fd, snapshot_head(header))

    header = stream("snapshot", out_fd, path, on_header=begin, filters=filters)
    if header is not None:
        write_all(out_fd, SNAPSHOT_END)
    return header


MAX_LINE = 1 << 20  # one streamed event; anything longer is not the agent's


def subscribe(path: str | None = None, heartbeat: float | None = None, **args: object) -> Iterator[dict | None]:
    """Events from the agent as they happen, one dict each, until the agent closes the
    stream. None is yielded whenever all that arrived has been handed over, and with
    `heartbeat` after that many quiet seconds (so that a reader can stop). Raises
    AgentError when no agent runs at the default path, too."""
    for line in subscribe_lines(path, heartbeat, **args):
        yield None if line is None else _event(line)


def subscribe_lines(path: str | None = None, heartbeat: float | None = None, **args: object) -> Iterator[bytes | None]:
    """subscribe's lines as the agent sent them, not yet parsed."""
    with _asking("events", path, args) as asked:
        if asked is None:
            raise AgentError(f"no sockwatch agent is running on {DEFAULT_SOCKET}")
        s, _header, buf = asked
        s.settimeout(heartbeat)  # a quiet host sends nothing for as long as it likes
        while True:
            lines = buf.split(b"\n")  # one pass per chunk (partitioning line by line is quadratic)
            buf = lines.pop()
            yield from lines
            if len(buf) > MAX_LINE:
                raise AgentError("the agent's event stream is malformed: a line has no end")
            yield None  # all that has come is handed over (a writer may flush now)
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                yield None
                continue
            if not chunk:
                return
            buf += chunk


def _event(line: bytes) -> dict:
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        d = None
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise AgentError("the agent's event stream is malformed: a line is not an event")
    return d


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
