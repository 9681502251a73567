"""Asking a running agent. Kept import-light: `snapshot --json` against an agent must
start, ask and stream the answer in a fraction of what ss takes."""

from __future__ import annotations

import json
import os
import socket

from sockwatch.agent.protocol import DEFAULT_SOCKET, encode_request


class AgentError(RuntimeError):
    pass


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None  # no agent: callers fall back to standalone
    except PermissionError:
        s.close()
        raise AgentError(f"the agent socket {path} is root-only: run with sudo") from None
    return s


def _read_header(s: socket.socket) -> tuple[dict, bytes]:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise AgentError("the agent closed the connection without answering")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    header = json.loads(line)
    if not header.get("ok"):
        raise AgentError(header.get("error", "the agent refused the request"))
    return header, rest


def request(op: str, path: str = DEFAULT_SOCKET, **args: object) -> tuple[dict, bytes] | None:
    """(header, body) from the agent, or None when no agent is running."""
    s = _connect(path)
    if s is None:
        return None
    with s:
        s.sendall(encode_request(op, **args))
        header, body = _read_header(s)
        chunks = [body]
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    return header, b"".join(chunks)


def stream(op: str, out_fd: int, path: str = DEFAULT_SOCKET, **args: object) -> dict | None:
    """Copy the agent's answer straight to out_fd (no parsing). None: no agent."""
    s = _connect(path)
    if s is None:
        return None
    with s:
        s.sendall(encode_request(op, **args))
        header, body = _read_header(s)
        write_all(out_fd, body)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := s.recv_into(buf):
            write_all(out_fd, view[:n])
    return header


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
