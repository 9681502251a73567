"""Every JSON output, real, against its schema in docs/schemas: a namespace of the test's
own with listeners, connections (one in TIME-WAIT), UDP sockets bound and connected and
a failed bind; `snapshot` standalone and from the agent, `events`, `ports`, `explain`,
`status`, and `snapshot --lookups`/`--peers` stamped as the others."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests import schemas
from tests.conftest import sockwatch_cmd
from tests.kernel.test_events import Stream


def out(*args: str) -> dict:
    r = subprocess.run(sockwatch_cmd(*args), check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def scene(netns, child_factory):
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=8080)
    c.do(op="tcp_listen", addr="::", port=8443, family=6, v6only=False)
    conn = c.do(op="tcp_connect", addr="127.0.0.1", port=8080, accept_on=lst["id"])
    tw = c.do(op="tcp_connect", addr="127.0.0.1", port=8080, accept_on=lst["id"])
    c.do(op="close", id=tw["id"])
    c.do(op="close", id=tw["accepted"]["id"])
    c.do(op="udp_bind", addr="0.0.0.0", port=5353)
    c.do(op="udp_connect", addr="127.0.0.1", port=5353)
    return c, conn


@pytest.mark.parametrize("where", ["standalone", "agent"])
def test_the_snapshot_document(netns, scene, where, request):
    extra = ["--standalone"] if where == "standalone" else ["--socket", request.getfixturevalue("agent").socket]
    doc = out("snapshot", "--json", "--netns", str(netns.inode), *extra)
    schemas.check("snapshot", doc)
    states = {s["state"] for s in doc["sockets"]}
    assert {"LISTEN", "ESTAB", "TIME-WAIT", "UNCONN"} <= states, states  # every kind of row was checked
    assert {s["family"] for s in doc["sockets"]} == {"ipv4", "ipv6"}
    whole = out("snapshot", "--json", *extra)  # the quick path's, for the agent (no filters)
    schemas.check("snapshot", whole)


def test_events_ports_explain_status_and_the_lookup_views(netns, agent, child_factory):
    sock = agent.socket
    s = Stream(sock, "--netns", str(netns.inode))
    try:
        c = child_factory(netns.name)
        lst = c.do(op="tcp_listen", addr="127.0.0.1", port=9090)
        conn = c.do(op="tcp_connect", addr="127.0.0.1", port=9090, accept_on=lst["id"])
        assert "error" in c.attempt(op="tcp_bind", addr="127.0.0.1", port=9090)  # EADDRINUSE
        c.do(op="close", id=conn["id"])
        kinds = set()
        for e in s.until(lambda es: {"bind_fail", "close"} <= {x["kind"] for x in es}):
            schemas.check("events", e)
            kinds.add(e["kind"])
        assert {"bind", "listen", "connect", "accept", "bind_fail"} <= kinds, kinds
    finally:
        s.stop()
    schemas.check("ports", out("ports", "--json", "--socket", sock))
    schemas.check("ports", out("ports", "--json", "--standalone", "--netns", str(netns.inode)))
    schemas.check("explain", out("explain", "tcp", "127.0.0.1:9090", "--netns", str(netns.inode), "--json"))
    schemas.check("explain", out("explain", "udp", "127.0.0.1:9", "--netns", str(netns.inode), "--json"))
    schemas.check("status", out("status", "--json", "--socket", sock))
    for view in ("--lookups", "--peers"):
        doc = out("snapshot", view, "--json", "--socket", sock)
        assert doc["schema_version"] == 1 and doc["timestamp"].endswith("Z"), doc
