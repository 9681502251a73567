"""The JSON schemas are valid schemas, and hold what sockwatch renders: rows as
model.row_json writes them (the snapshot's sockets), event lines as the stream writes
them, and the document heads. Real output is validated in tests/kernel/test_json_schemas.py."""

from __future__ import annotations

import ipaddress
import json

import pytest

from sockwatch import schema, stream
from sockwatch.containers import Container
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState, render_json
from tests import schemas


@pytest.mark.parametrize("name", schemas.NAMES)
def test_each_schema_is_a_valid_schema(name):
    schemas.validator(name)


def _row(**kw) -> SockRow:
    base = dict(cookie=9, protocol=IPPROTO_TCP, family=4, state=TcpState.ESTABLISHED,
                local_address=ipaddress.ip_address("10.0.0.1"), local_port=40000,
                remote_address=ipaddress.ip_address("10.0.0.2"), remote_port=443, netns=4026531840)  # fmt: skip
    return SockRow(**(base | kw))


ROWS = [
    _row(),
    _row(
        state=TcpState.LISTEN,
        remote_address=None,
        remote_port=0,
        pid=1,
        comm="nginx",
        uid=0,
        inode=5,
        owner_source="hook",
    ),
    _row(
        protocol=IPPROTO_UDP,
        family=6,
        state=TcpState.CLOSE,
        local_address=ipaddress.ip_address("::"),
        remote_address=None,
        remote_port=0,
        device="eth0",
    ),
    _row(container=Container("/user.slice/user-0.slice/session-1.scope", None, None, None, None, None, None)),
    _row(container=Container("/kubepods/pod1/abc", "containerd", "abc" * 10, None, "default", "web", "u-1")),
]


def test_the_snapshot_document_holds_every_kind_of_row():
    doc = json.loads(schema.snapshot_head({"partial": ["a note"]}) + render_json(ROWS) + schema.SNAPSHOT_END)
    schemas.check("snapshot", doc)
    socks = doc["sockets"]
    assert [s["family"] for s in socks[:3]] == ["ipv4", "ipv4", "ipv6"]
    assert (socks[1]["remote_address"], socks[1]["remote_port"]) == (None, None)
    assert socks[3]["container"] is None  # a login session's cgroup is no container: null, as none
    assert socks[4]["container"]["pod_name"] == "web"


@pytest.mark.parametrize("bad", [
    {"family": 4}, {"remote_port": 0}, {"remote_address": None}, {"state": "listen"},
    {"container": {"cgroup": "/x"}}, {"extra": 1},
])  # fmt: skip
def test_the_schema_refuses_what_the_vocabulary_does_not_have(bad):
    doc = json.loads(schema.snapshot_head() + render_json(ROWS[:1]) + schema.SNAPSHOT_END)
    doc["sockets"][0] |= bad
    with pytest.raises(AssertionError):
        schemas.check("snapshot", doc)


def test_event_lines_hold_the_events_schema():
    s = stream.Sock(7, 4026531840, 4, IPPROTO_TCP, "127.0.0.1", 8080, None, 0, 42, 0, "web", 0, False)
    listen = stream.StreamEvent("listen", s, TcpState.LISTEN, 1_000_000_000)
    failed = stream.StreamEvent("bind_fail", s, 0, 1_000_000_000, bind="asked", errno=98, holders=[(s, 10)])
    for e in (listen, failed):
        schemas.check("events", json.loads(e.json_line(1000.0)))
    schemas.check("events", json.loads(stream.lost_line(3, 12.5, "ring")))
    schemas.check("events", json.loads(stream.miss_line(12.5, 4026531840, IPPROTO_TCP, 81, 2, ["127.0.0.1"])))


def test_timestamps_are_rfc3339_utc_milliseconds():
    assert schema.timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert schema.timestamp(1733250000.25) == "2024-12-03T18:20:00.250Z"
    assert schema.stamped({"a": 1}, {"timestamp": "x"})["timestamp"] == "x"
    assert list(schema.stamped({"a": 1})) == ["schema_version", "timestamp", "a"]
