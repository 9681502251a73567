"""Ephemeral-port exhaustion, for real: a namespace whose ip_local_port_range holds ten
ports, connections to one destination until the kernel refuses the next connect() with
EADDRNOTAVAIL; `sockwatch ports` must already say 100% for that destination."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import sockwatch_cmd

EADDRNOTAVAIL = 99


def ports_report(*args: str) -> dict:
    r = subprocess.run(sockwatch_cmd("ports", "--json", *args), capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("source", ["agent", "standalone"])
def test_a_full_range_is_100_percent_and_the_next_connect_fails(source, agent, netns, child_factory):
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009"],
                   check=True)  # fmt: skip
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=40009"],
                   check=True)  # fmt: skip
    c = child_factory(netns.name)
    srv = c.do(op="tcp_listen", addr="127.0.0.1", port=5000)
    other = c.do(op="tcp_listen", addr="127.0.0.1", port=5001)
    made = [c.do(op="tcp_connect", addr="127.0.0.1", port=5000, accept_on=srv["id"]) for _ in range(9)]
    refused = c.attempt(op="tcp_connect", addr="127.0.0.1", port=5000)
    assert refused.get("errno") == EADDRNOTAVAIL, refused  # the kernel agrees the range is spent
    c.do(op="tcp_connect", addr="127.0.0.1", port=5001, accept_on=other["id"])  # another destination still works
    args = ("--socket", agent.socket) if source == "agent" else ("--standalone",)
    report = ports_report(*args, "--netns", netns.name)
    ns = next(n for n in report["namespaces"] if n["netns"] == netns.inode)
    assert (ns["range"], ns["reserved"], ns["available"]) == ([40000, 40009], 1, 9)
    assert ns["classes"]["reserved"] == [[40009, 40009]] and ns["classes"]["privileged"] == [1, 1023]
    worst = report["pressure"][0]
    assert (worst["protocol"], worst["remote_address"], worst["remote_port"]) == ("tcp", "127.0.0.1", 5000)
    assert (worst["used"], worst["available"], worst["percent"], worst["time_wait"]) == (9, 9, 100.0, 0)
    second = report["pressure"][1]
    assert (second["remote_port"], second["used"]) == (5001, 1)
    # closing the client ends first leaves TIME-WAIT: still used, and counted apart
    for m in made[:3]:
        c.do(op="close", id=m["id"])
        c.do(op="close", id=m["accepted"]["id"])
    report = ports_report(*args, "--netns", netns.name)
    worst = report["pressure"][0]
    assert (worst["remote_port"], worst["used"], worst["time_wait"], worst["percent"]) == (5000, 9, 3, 100.0)
    r = subprocess.run(sockwatch_cmd("ports", *args, "--netns", netns.name), capture_output=True, text=True,
                       check=False, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "100.0      9          3          9  tcp" in r.stdout, r.stdout
