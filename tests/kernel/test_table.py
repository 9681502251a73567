"""sockwatch's table against ss's, socket for socket, in a namespace of the test's own.

Every scenario runs twice: standalone (sock_diag + /proc) and against a `sockwatch serve`
started before the sockets exist, where the hooks must have put every row in the table
(owners from hooks, no reconcile repairs)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import compare_with_ss


@pytest.fixture(params=["standalone", "agent"])
def mode(request: pytest.FixtureRequest) -> str | None:
    if request.param == "standalone":
        return None
    return request.getfixturevalue("agent").socket


def hooks_name_owners(socket: str) -> set[str]:
    """The protocols whose owners this agent's hooks name: a kernel whose sockops cannot
    read the current task (before 6.2) gets the variant without owners, and its TCP
    owners come from /proc (status says so)."""
    st = json.loads(subprocess.run(sockwatch_cmd("status", "--json", "--socket", socket), check=True,
                                   capture_output=True, text=True).stdout)  # fmt: skip
    lesser = any(note.startswith("sockops") for note in st.get("hooks_lesser", []))
    return {"udp"} if lesser else {"udp", "tcp"}


def check(netns, mode, child, agent_fixture=None, from_proc: frozenset[int] = frozenset()) -> list[dict]:
    """`from_proc`: sockets no hook sees bound (a sendto()'s port), whose owner is read
    from /proc as ss -p reads it; so is a connected UDP socket's that bind() did not
    bind (connect4/6 run only while someone streams)."""
    rows = compare_with_ss(netns, mode, expect_pid=child.pid)
    assert rows, "the scenario opened no sockets?"
    if mode is not None:
        by_hooks = hooks_name_owners(mode)
        for r in rows:
            if r["state"] != "TIME-WAIT":
                hooked = r["protocol"] in by_hooks and r["cookie"] not in from_proc
                hooked &= not (r["protocol"] == "udp" and r["remote_port"])
                allowed = ("hook", "listener") if hooked else ("hook", "listener", "proc")
                assert r["owner_source"] in allowed, f"owner of {r} not from a hook"
    return rows


def no_repairs(agent, rows: list[dict]) -> None:
    st = agent.status(reconcile=True)
    repaired = set(st["tracker"]["repaired_cookies"])
    ours = {r["cookie"] for r in rows}
    assert not (repaired & ours), f"reconcile had to repair {repaired & ours}"


@pytest.fixture
def finish(request: pytest.FixtureRequest, mode):
    """After a scenario in agent mode: the reconcile must find nothing to repair."""

    def done(rows: list[dict]) -> None:
        if mode is not None:
            no_repairs(request.getfixturevalue("agent"), rows)

    return done


def test_tcp_listener_and_both_ends(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=8080)
    conns = [c.do(op="tcp_connect", addr="127.0.0.1", port=8080, accept_on=lst["id"]) for _ in range(3)]
    rows = check(netns, mode, c)
    by_cookie = {r["cookie"]: r for r in rows}
    assert by_cookie[lst["cookie"]]["state"] == "LISTEN"
    for cn in conns:
        client, server = by_cookie[cn["cookie"]], by_cookie[cn["accepted"]["cookie"]]
        assert (client["remote_port"], server["remote_port"]) == (8080, client["local_port"])
        assert client["inode"] == cn["inode"] and server["inode"] == cn["accepted"]["inode"]
    finish(rows)


def test_udp_wildcard_and_specific_same_port(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    c.do(op="udp_bind", addr="0.0.0.0", port=5353, reuseaddr=True)
    c.do(op="udp_bind", addr="127.0.0.1", port=5353, reuseaddr=True)
    rows = check(netns, mode, c)
    assert sorted(r["local_address"] for r in rows if r["local_port"] == 5353) == ["0.0.0.0", "127.0.0.1"]
    finish(rows)


def test_reuseport_groups(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    tcp = [c.do(op="tcp_listen", addr="127.0.0.1", port=9000, reuseport=True) for _ in range(3)]
    udp = [c.do(op="udp_bind", addr="0.0.0.0", port=9001, reuseport=True) for _ in range(3)]
    rows = check(netns, mode, c)
    cookies = {r["cookie"] for r in rows}
    assert {s["cookie"] for s in tcp + udp} <= cookies
    finish(rows)


def test_ipv6_and_dual_stack_listener_takes_ipv4(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    dual = c.do(op="tcp_listen", family=6, addr="::", port=8443, v6only=False)
    c.do(op="tcp_listen", family=6, addr="::1", port=8444)
    c.do(op="udp_bind", family=6, addr="::1", port=5300)
    v4 = c.do(op="tcp_connect", addr="127.0.0.1", port=8443, accept_on=dual["id"])
    v6 = c.do(op="tcp_connect", family=6, addr="::1", port=8444)
    rows = check(netns, mode, c)
    accepted = next(r for r in rows if r["cookie"] == v4["accepted"]["cookie"])
    assert accepted["family"] == "ipv6" and accepted["local_address"] == "::ffff:127.0.0.1"
    assert any(r["cookie"] == v6["cookie"] and r["family"] == "ipv6" for r in rows)
    finish(rows)


def test_connected_udp(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    c.do(op="udp_bind", addr="127.0.0.1", port=5400)
    auto = c.do(op="udp_connect", addr="127.0.0.1", port=5400)  # autobinds
    bound = c.do(op="udp_connect", addr="127.0.0.1", port=5400, bind_addr="127.0.0.1", bind_port=5401)
    v6 = c.do(op="udp_connect", family=6, addr="::1", port=5402)
    rows = check(netns, mode, c)
    by_cookie = {r["cookie"]: r for r in rows}
    for s in (auto, bound, v6):
        r = by_cookie[s["cookie"]]
        assert r["state"] == "ESTAB" and r["local_port"] == s["local"][1] and r["remote_port"] == s["remote"][1]
    finish(rows)


def test_autobound_udp_and_tcp(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    srv = c.do(op="tcp_listen", addr="127.0.0.1", port=7000)
    c.do(op="udp_bind", addr="127.0.0.1", port=7001)
    sent = c.do(op="udp_sendto", addr="127.0.0.1", port=7001)  # sendto without bind
    conn = c.do(op="tcp_connect", addr="127.0.0.1", port=7000, accept_on=srv["id"])  # connect without bind
    nop = c.do(  # IP_BIND_ADDRESS_NO_PORT: bind the address, the port comes at connect
        op="tcp_connect", addr="127.0.0.1", port=7000, no_port_bind=True, bind_addr="127.0.0.1", accept_on=srv["id"]
    )
    nobind = c.do(op="tcp_listen", addr="", bind=False)  # listen without bind: autobound port
    rows = check(netns, mode, c, from_proc=frozenset({sent["cookie"]}))
    by_cookie = {r["cookie"]: r for r in rows}
    assert by_cookie[sent["cookie"]]["local_port"] == sent["local"][1]
    assert by_cookie[conn["cookie"]]["local_port"] == conn["local"][1]
    assert by_cookie[nop["cookie"]]["local_port"] == nop["local"][1]
    assert (
        by_cookie[nobind["cookie"]]["state"] == "LISTEN"
        and by_cookie[nobind["cookie"]]["local_port"] == nobind["local"][1]
    )
    finish(rows)


def test_closed_sockets_disappear(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=7100)
    udp = c.do(op="udp_bind", addr="127.0.0.1", port=7101)
    rst = c.do(op="tcp_connect", addr="127.0.0.1", port=7100, accept_on=lst["id"])
    tw = c.do(op="tcp_connect", addr="127.0.0.1", port=7100, accept_on=lst["id"])
    check(netns, mode, c)
    c.do(op="close", id=udp["id"])
    c.do(op="close", id=rst["id"], rst=True)
    c.do(op="close", id=rst["accepted"]["id"])
    c.do(op="close", id=tw["id"])  # active close: TIME-WAIT once the peer closes too
    c.do(op="close", id=tw["accepted"]["id"])
    c.do(op="close", id=lst["id"])
    rows = check(netns, mode, c)
    cookies = {r["cookie"] for r in rows}
    assert not cookies & {udp["cookie"], rst["cookie"], rst["accepted"]["cookie"], lst["cookie"]}
    assert [r["state"] for r in rows if r["cookie"] == tw["cookie"]] == ["TIME-WAIT"]
    finish(rows)


def test_second_namespace_is_reported_as_such(netns, mode, child_factory, finish):
    c = child_factory(netns.name)
    c.do(op="udp_bind", addr="0.0.0.0", port=53)
    rows = check(netns, mode, c)
    assert all(r["netns"] == netns.inode for r in rows)
    finish(rows)


# Sockets bound to devices (SO_BINDTODEVICE): the device is part of the kernel's lookup
# key, and ss prints it (0.0.0.0%d0:7331). Held until stdin closes.
BOUND = """
import socket, sys
held = []
for dev, kind, port in (("lo", socket.SOCK_STREAM, 7331), ("d0", socket.SOCK_STREAM, 7331),
                        ("d0", socket.SOCK_DGRAM, 7332), ("lo", socket.SOCK_DGRAM, 7332)):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    held.append(s)
print("up", flush=True)
sys.stdin.read()
"""


def test_sockets_bound_to_devices_show_their_device(netns, mode):
    subprocess.run(["ip", "-n", netns.name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
    subprocess.run(["ip", "-n", netns.name, "link", "set", "d0", "up"], check=True)
    p = subprocess.Popen(["ip", "netns", "exec", netns.name, "python3", "-c", BOUND],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        rows = compare_with_ss(netns, mode)  # (it compares each row's device with ss's)
        assert sorted((r["protocol"], r["local_port"], r["device"]) for r in rows) == [
            ("tcp", 7331, "d0"), ("tcp", 7331, "lo"), ("udp", 7332, "d0"), ("udp", 7332, "lo")]  # fmt: skip
        args = ("--netns", str(netns.inode)) + (("--socket", mode) if mode else ("--standalone",))
        table = subprocess.run(sockwatch_cmd("snapshot", *args), capture_output=True, text=True, check=True).stdout
        assert "0.0.0.0%d0:7331" in table and "0.0.0.0%lo:7332" in table, table
    finally:
        if p.stdin:
            p.stdin.close()
        p.wait(10)


def test_the_quick_snapshot_is_the_clis_byte_for_byte(agent, child_factory, netns):
    """`snapshot --json` against an agent skips building the CLI (no typer is imported),
    and answers exactly what the CLI does, but for the timestamp of each answer (three
    tries: the host's table may move between)."""
    import re
    import sys

    child = child_factory(netns.name)
    child.do(op="tcp_listen", addr="127.0.0.1", port=7431)
    quick = subprocess.run([sys.executable, "-X", "importtime", "-m", "sockwatch", "snapshot", "--json",
                            "--socket", agent.socket], capture_output=True, check=True)  # fmt: skip
    assert b"typer" not in quick.stderr and b"sockwatch.cli" not in quick.stderr
    full_cli = ["-c", "import sys; from sockwatch.cli import main; sys.argv[0] = 'sockwatch'; main()"]
    for _ in range(3):
        quick_out = subprocess.run(sockwatch_cmd("snapshot", "--json", "--socket", agent.socket),
                                   capture_output=True, check=True).stdout  # fmt: skip
        full_out = subprocess.run([sys.executable, *full_cli, "snapshot", "--json", "--socket", agent.socket],
                                  capture_output=True, check=True).stdout  # fmt: skip
        stamp = re.compile(rb'"timestamp": "[0-9T:.Z-]{24}"')
        assert stamp.search(quick_out) and stamp.search(full_out), (quick_out[:200], full_out[:200])
        quick_out, full_out = (stamp.sub(b'"timestamp": ""', o, count=1) for o in (quick_out, full_out))
        if quick_out == full_out:
            break
    assert quick_out == full_out
    assert any(r["local_port"] == 7431 for r in json.loads(quick_out)["sockets"])
