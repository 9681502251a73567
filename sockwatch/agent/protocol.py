"""The agent's local wire format: one JSON request line; one JSON header line back,
then the body (for snapshots, the JSON array ready to print) until the agent closes.

Both sides treat what comes over the socket as untrusted: a request is checked field by
field before the agent acts on it, and an answer is checked before the CLI shows it.
"""

from __future__ import annotations

import json
import os

from sockwatch import __version__
from sockwatch.schema import SCHEMA_VERSION, timestamp

# (no dataclasses or typing here: `snapshot --json` imports this module on every run, and
# they cost ~9 ms of its start)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SOCKET = os.environ.get("SOCKWATCH_SOCKET", "/run/sockwatch/agent.sock")
MAX_REQUEST = 64 * 1024
MAX_HEADER = 64 * 1024
OPS = ("snapshot", "status", "events", "view", "ports", "lookups", "peers", "drops")
VIEWS = ("all", "listeners", "connections", "processes", "peers", "drops")
SORTS = ("local", "remote", "state", "protocol", "pid", "comm", "age", "netns")
EVENT_KINDS = ("bind", "bind_fail", "listen", "connect", "accept", "state", "close", "miss", "drop")
MAX_LIMIT = 10_000
FIELDS = ("op", "filters", "reconcile", "kinds", "view", "sort", "reverse", "offset", "limit", "bpf_stats")
MAX_BPF_STATS_SECONDS = 300


class ProtocolError(ValueError):
    """A request or answer that does not follow the protocol; the message says how."""


class Request:
    __slots__ = FIELDS

    def __init__(
        self,
        op: str,
        filters: dict[str, Any] | None = None,  # checked by filters.from_wire
        reconcile: bool = False,
        kinds: tuple[str, ...] = (),  # events: only these (empty: all)
        view: str = "all",  # view: which rows
        sort: str = "local",
        reverse: bool = False,
        offset: int = 0,
        limit: int = 100,
        bpf_stats: int = 0,  # status: keep the kernel's BPF stats on this many seconds more
    ) -> None:
        self.op = op
        self.filters = {} if filters is None else filters
        self.reconcile = reconcile
        self.kinds = kinds
        self.view = view
        self.sort = sort
        self.reverse = reverse
        self.offset = offset
        self.limit = limit
        self.bpf_stats = bpf_stats

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in FIELDS)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Request(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in FIELDS) + ")"


def encode_request(op: str, **args: object) -> bytes:
    return json.dumps({"op": op, **args}).encode() + b"\n"


def encode_header(ok: bool, **info: object) -> bytes:
    """Every answer's first line: its JSON schema's version (a CLI of another refuses the
    answer in one sentence), when it was taken, and the agent's version."""
    return json.dumps({"ok": ok, "schema_version": SCHEMA_VERSION, "timestamp": timestamp(),
                       "agent_version": __version__, **info}).encode() + b"\n"  # fmt: skip


def _loads(line: bytes, what: str) -> Any:
    try:
        return json.loads(line)
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise ProtocolError(f"{what} is not valid JSON") from None


def parse_request(line: bytes) -> Request:
    """One request line into a Request, or ProtocolError naming what is wrong."""
    d = _loads(line, "the request")
    if not isinstance(d, dict):
        raise ProtocolError("the request is not a JSON object")
    op = d.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"'op' must be one of: {', '.join(OPS)}")
    unknown = sorted(str(k)[:40] for k in d if k not in FIELDS)
    if unknown:
        raise ProtocolError(f"unknown request fields: {', '.join(unknown[:5])}")
    filters = d.get("filters")
    if filters is None:
        filters = {}
    if not isinstance(filters, dict):
        raise ProtocolError("'filters' must be a JSON object")
    reconcile = _flag(d, "reconcile")
    kinds = d.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k in EVENT_KINDS for k in kinds):
        raise ProtocolError(f"'kinds' must be a list of: {', '.join(EVENT_KINDS)}")
    return Request(
        op,
        filters,
        reconcile,
        tuple(kinds),
        _choice(d, "view", VIEWS),
        _choice(d, "sort", SORTS),
        _flag(d, "reverse"),
        _count(d, "offset", 0, 2**31),
        _count(d, "limit", 100, MAX_LIMIT),
        _count(d, "bpf_stats", 0, MAX_BPF_STATS_SECONDS),
    )


def _flag(d: dict, name: str) -> bool:
    v = d.get(name, False)
    if not isinstance(v, bool):
        raise ProtocolError(f"'{name}' must be true or false")
    return v


def _choice(d: dict, name: str, allowed: tuple[str, ...]) -> str:
    v = d.get(name, allowed[0])
    if not isinstance(v, str) or v not in allowed:
        raise ProtocolError(f"'{name}' must be one of: {', '.join(allowed)}")
    return v


def _count(d: dict, name: str, default: int, most: int) -> int:
    v = d.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= most:
        raise ProtocolError(f"'{name}' must be a whole number from 0 to {most}")
    return v


def parse_header(line: bytes) -> dict[str, Any]:
    """An answer's header line (client side)."""
    h = _loads(line, "the agent's answer")
    if not isinstance(h, dict) or not isinstance(h.get("ok"), bool):
        raise ProtocolError("the agent's answer has no valid header")
    if not h["ok"] and not isinstance(h.get("error"), str):
        raise ProtocolError("the agent refused the request without saying why")
    return h
