"""What every JSON document sockwatch prints shares: its schema's version and when it was
taken, and one spelling of an address family (as the metrics' `family` label has it).
The schemas themselves are in docs/schemas/, one per output; tests validate real output
against them."""

from __future__ import annotations

import time

# Raised when a key is renamed, removed or changes type; new keys do not raise it. An
# agent and a CLI of different versions refuse to talk (the CLI says so).
SCHEMA_VERSION = 1
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}
FAMILY_NUMBERS = {v: k for k, v in FAMILY_NAMES.items()}


def timestamp(at: float | None = None) -> str:
    """RFC 3339, UTC, milliseconds: 2026-12-03T18:41:18.123Z."""
    t = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def stamped(body: dict, header: dict | None = None) -> dict:
    """A document: schema_version and timestamp first (the agent's answer's, given its
    header; else now), then `body`."""
    at = (header or {}).get("timestamp")
    return {"schema_version": SCHEMA_VERSION, "timestamp": at if isinstance(at, str) else timestamp(), **body}


def family_number(name: object) -> int:
    """4 or 6 from "ipv4"/"ipv6" (what came over the wire); ValueError otherwise."""
    n = FAMILY_NUMBERS.get(name) if isinstance(name, str) else None
    if n is None:
        raise ValueError(f"family {name!r} is not ipv4 or ipv6")
    return n


def snapshot_head(header: dict | None = None, partial: list[str] | None = None) -> bytes:
    """A snapshot document up to its array of sockets (which follows, then SNAPSHOT_END):
    the agent's header gives its time and what the answer may lack; standalone, now."""
    import json

    h = header or {}
    notes = h.get("partial") if isinstance(h.get("partial"), list) else (partial or [])
    at = h.get("timestamp") if isinstance(h.get("timestamp"), str) else timestamp()
    head = json.dumps({"schema_version": SCHEMA_VERSION, "timestamp": at, "partial": notes})
    return head[:-1].encode() + b', "sockets": '


SNAPSHOT_END = b"}\n"
