"""The agent's local wire format: one JSON request line; one JSON header line back,
then the body (for snapshots, the JSON array ready to print) until the agent closes."""

from __future__ import annotations

import json
import os

DEFAULT_SOCKET = os.environ.get("SOCKWATCH_SOCKET", "/run/sockwatch/agent.sock")
MAX_REQUEST = 64 * 1024


def encode_request(op: str, **args: object) -> bytes:
    return json.dumps({"op": op, **args}).encode() + b"\n"


def encode_header(ok: bool, **info: object) -> bytes:
    return json.dumps({"ok": ok, **info}).encode() + b"\n"
