"""`sockwatch events` against what the test's own sockets did: binds asked for and
implicit (with the port the kernel really chose), failed binds with the errno bind()
really returned and who holds the port, listen/connect/accept/close in order for TCP
and UDP, IPv4 and IPv6, and a TCP close carrying the bytes really sent and received.
The stream is read through the CLI, as a person runs it."""

from __future__ import annotations

import errno
import json
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import PACE, sockwatch_cmd
from tests.kernel.conftest import CHILD_COMM, AgentProc, Netns, snapshot, subscribers, wait_subscribed

EADDRINUSE = 98


class Stream:
    """`sockwatch events --json` in the background; lines collected as they come."""

    def __init__(self, socket: str, *args: str) -> None:
        before = subscribers(socket)
        self.proc = subprocess.Popen(
            sockwatch_cmd("events", "--json", "--socket", socket, *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            wait_subscribed(socket, self.proc, before)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def until(self, done: Callable[[list[dict]], bool], timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                err = self.stop() if self.proc.poll() is not None else "(still running)"
                raise AssertionError(f"stream did not show it within {timeout}s; got {self.seen[-20:]}; stderr {err}")
            try:
                self.seen.append(self.lines.get(timeout=min(left, 0.5)))
                while True:  # all that has come, before `done` looks again: it scans every line seen,
                    self.seen.append(self.lines.get_nowait())  # and one look a line was quadratic after a burst
            except queue.Empty:
                continue
        return self.seen

    def mine(self, ns: Netns) -> list[dict]:
        return [e for e in self.seen if e.get("netns") == ns.inode]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr and not self.proc.stderr.closed else ""
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return err


@pytest.fixture
def streams() -> Iterator[Callable[..., Stream]]:
    made: list[Stream] = []

    def make(socket: str, *args: str) -> Stream:
        s = Stream(socket, *args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def has(kind: str, cookie: int, **fields: object) -> Callable[[list[dict]], bool]:
    return lambda seen: any(
        e["kind"] == kind and e.get("cookie") == cookie and all(e.get(k) == v for k, v in fields.items()) for e in seen
    )


def find(seen: list[dict], kind: str, cookie: int) -> dict:
    return next(e for e in seen if e["kind"] == kind and e.get("cookie") == cookie)


def test_a_failed_bind_names_the_errno_the_failing_process_and_the_holder(agent, netns, child_factory, streams):
    holder, failer = child_factory(netns.name), child_factory(netns.name)
    s = streams(agent.socket, "--netns", netns.name)
    lst = holder.do(op="tcp_listen", addr="0.0.0.0", port=8080)
    got = failer.attempt(op="tcp_bind", addr="127.0.0.1", port=8080, reuseaddr=True)
    assert got.get("errno") == EADDRINUSE, got  # what bind() really returned
    seen = s.until(lambda seen: any(e["kind"] == "bind_fail" for e in seen))
    fail = next(e for e in seen if e["kind"] == "bind_fail")
    assert fail["errno"] == "EADDRINUSE" and fail["error"] == os.strerror(EADDRINUSE)
    assert (fail["pid"], fail["comm"], fail["local_address"], fail["local_port"]) == (
        failer.pid, CHILD_COMM, "127.0.0.1", 8080)  # fmt: skip
    assert [(h["pid"], h["cookie"], h["state"]) for h in fail["holders"]] == [(holder.pid, lst["cookie"], "LISTEN")]
    # the command that asks why, with the options the failing socket had, ready to paste
    assert fail["explain"] == f"sockwatch explain bind tcp 127.0.0.1:8080 --reuseaddr --uid 0 --netns {netns.inode}"
    r = subprocess.run(sockwatch_cmd(*shlex.split(fail["explain"])[1:], "--json"), capture_output=True, text=True,
                       check=False, timeout=60)  # fmt: skip
    said = json.loads(r.stdout)
    assert (said["errno"], [c["cookie"] for c in said["conflicts"]]) == ("EADDRINUSE", [lst["cookie"]]), said


def _first_bind_fail_line(agent: AgentProc, netns: Netns, act: Callable[[], None]) -> str:
    """The first line `sockwatch events --kind bind_fail` prints, as text, once `act` ran."""
    before = subscribers(agent.socket)
    proc = subprocess.Popen(
        sockwatch_cmd("events", "--socket", agent.socket, "--netns", str(netns.inode), "--kind", "bind_fail"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_subscribed(agent.socket, proc, before)
        act()
        assert proc.stdout
        return proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(5)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def test_a_failed_bind_as_text_says_who_holds_the_port(agent, netns, child_factory):
    holder, failer = child_factory(netns.name), child_factory(netns.name)
    holder.do(op="udp_bind", addr="127.0.0.1", port=5353)

    def fail() -> None:
        got = failer.attempt(op="udp_bind", addr="0.0.0.0", port=5353)
        assert got.get("errno") == EADDRINUSE, got

    line = _first_bind_fail_line(agent, netns, fail)
    assert "BIND_FAIL udp 0.0.0.0:5353" in line and f"{failer.pid}/{CHILD_COMM}" in line, line
    assert (
        "EADDRINUSE (Address already in use)" in line
        and f"held by {holder.pid}/{CHILD_COMM} (UNCONN 127.0.0.1:5353)" in line
    )


@pytest.mark.parametrize("family", [4, 6])
def test_implicit_binds_carry_the_port_the_kernel_chose(agent, netns, child_factory, streams, family):
    lo = "127.0.0.1" if family == 4 else "::1"
    c = child_factory(netns.name)
    s = streams(agent.socket, "--netns", netns.name)
    srv = c.do(op="tcp_listen", addr=lo, family=family)  # bind(port 0) + listen
    nobind = c.do(op="tcp_listen", addr=lo, family=family, bind=False)  # listen without bind
    conn = c.do(op="tcp_connect", addr=lo, port=srv["local"][1], family=family, accept_on=srv["id"])
    noport = c.do(op="tcp_connect", addr=lo, port=srv["local"][1], family=family, no_port_bind=True,
                  bind_addr=lo, accept_on=srv["id"])  # fmt: skip
    sent = c.do(op="udp_sendto", addr=lo, port=9, family=family)
    uconn = c.do(op="udp_connect", addr=lo, port=53, family=family)
    asked = c.do(op="udp_bind", addr=lo, port=0, family=family)
    cases = [
        ("bind", srv, "port 0"),
        ("listen", nobind, "listen"),
        ("connect", conn, "connect"),
        ("bind", noport, "no port"),
        ("connect", noport, "connect"),
        ("bind", sent, "sendto"),
        ("connect", uconn, "connect"),
        ("bind", asked, "port 0"),
    ]
    seen = s.until(lambda seen: all(has(k, x["cookie"])(seen) for k, x, _ in cases))
    # sockops before 6.2 cannot read the task: a listen() no bind() came before has no owner
    lesser = any(h.startswith("sockops") for h in agent.status()["hooks_lesser"])
    for kind, x, how in cases:
        e = next(e for e in seen if e["kind"] == kind and e["cookie"] == x["cookie"] and e.get("bind") == how)
        want_port = 0 if how == "no port" else x["local"][1]
        assert e["local_port"] == want_port, (kind, how, e)
        want_pid = None if lesser and how == "listen" else c.pid
        assert e["pid"] == want_pid and e["family"] == f"ipv{family}", e
    assert find(seen, "listen", srv["cookie"]).get("bind") is None  # bound first: not an implicit bind


def test_without_owners_in_sockops_tcp_owners_come_from_bind_and_connect(fresh_agent, netns, child_factory):
    """Kernels before 6.2 (Debian 12's 6.1) load sockops without owners. Here the agent
    loads that variant as such a kernel makes it (SOCKWATCH_LESSER), and the stream still
    names who listens (the bind's owner), who connects (cgroup connect4 leaves it for
    sockops) and who accepts (the listener's); only a listen() with no bind() before it
    has none in the stream, and the table finds that one in /proc when a view asks."""
    a = fresh_agent(None, (), ("env", "SOCKWATCH_LESSER=sw_sockops"))
    assert any(h.startswith("sockops") for h in a.status()["hooks_lesser"])
    c = child_factory(netns.name)
    s = Stream(a.socket, "--netns", netns.name)
    try:
        srv = c.do(op="tcp_listen", addr="127.0.0.1")
        conn = c.do(op="tcp_connect", addr="127.0.0.1", port=srv["local"][1], accept_on=srv["id"])
        nobind = c.do(op="tcp_listen", addr="127.0.0.1", bind=False)
        want = [("listen", srv), ("connect", conn), ("accept", conn["accepted"]), ("listen", nobind)]
        seen = s.until(lambda seen: all(has(k, x["cookie"])(seen) for k, x in want))
    finally:
        s.stop()
    owners = [find(seen, k, x["cookie"])["pid"] for k, x in want]
    assert owners == [c.pid, c.pid, c.pid, None], owners
    rows = {r["cookie"]: r for r in snapshot("--netns", str(netns.inode), socket=a.socket)}
    assert rows[nobind["cookie"]]["pid"] == c.pid and rows[conn["cookie"]]["pid"] == c.pid, rows


@pytest.mark.parametrize("family", [4, 6])
def test_events_follow_what_the_test_did_in_order_and_a_close_has_the_bytes(agent, netns, child_factory, streams,
                                                                            family):  # fmt: skip
    lo = "127.0.0.1" if family == 4 else "::1"
    c = child_factory(netns.name)
    s = streams(agent.socket, "--netns", netns.name)
    srv = c.do(op="tcp_listen", addr=lo, port=7000, family=family)
    cl = c.do(op="tcp_connect", addr=lo, port=7000, family=family, accept_on=srv["id"])
    acc = cl["accepted"]
    c.do(op="send", id=cl["id"], n=12345)
    c.do(op="recv", id=acc["id"], n=12345)
    c.do(op="send", id=acc["id"], n=678)
    c.do(op="recv", id=cl["id"], n=678)
    time.sleep(0.3)  # a lifetime the kernel's tick can see
    c.do(op="close", id=cl["id"])
    c.do(op="close", id=acc["id"])
    u = c.do(op="udp_bind", addr=lo, port=7001, family=family)
    c.do(op="close", id=u["id"])
    seen = s.until(lambda seen: has("close", u["cookie"])(seen) and has("close", acc["cookie"])(seen))
    mine = [(e["kind"], e["cookie"]) for e in s.mine(netns) if e["kind"] != "state"]
    assert mine == [
        ("bind", srv["cookie"]),
        ("listen", srv["cookie"]),
        ("connect", cl["cookie"]),
        ("accept", acc["cookie"]),
        ("close", cl["cookie"]),  # the active closer: FIN-WAIT-2 -> TIME-WAIT (its socket closes)
        ("close", acc["cookie"]),  # LAST-ACK -> CLOSE
        ("bind", u["cookie"]),
        ("close", u["cookie"]),
    ], mine
    states = [
        (e["old_state"], e["state"]) for e in s.mine(netns) if e["kind"] == "state" and e["cookie"] == cl["cookie"]
    ]
    assert states == [("ESTAB", "FIN-WAIT-1"), ("FIN-WAIT-1", "FIN-WAIT-2")], states
    client_end, server_end = find(seen, "close", cl["cookie"]), find(seen, "close", acc["cookie"])
    assert client_end["lifetime"]["bytes_sent"] == 12345 and client_end["lifetime"]["bytes_received"] == 678
    assert server_end["lifetime"]["bytes_sent"] == 678 and server_end["lifetime"]["bytes_received"] == 12345
    assert server_end["pid"] == c.pid and find(seen, "accept", acc["cookie"])["pid"] == c.pid  # its listener's owner
    for end in (client_end, server_end):
        life = end["lifetime"]
        assert 0.29 <= life["seconds"] < 10 and life["retransmits"] == 0 and life["srtt_us"] > 0, end
    assert (client_end["local_port"], client_end["remote_port"]) == (cl["local"][1], 7000)


def test_several_streams_share_one_agent_and_its_hooks(agent, netns, child_factory, streams):
    links = agent.status()["links"]
    a = streams(agent.socket, "--netns", netns.name, "--proto", "udp")
    b = streams(agent.socket, "--netns", netns.name, "--kind", "close")
    c = child_factory(netns.name)
    t = c.do(op="tcp_listen", addr="127.0.0.1")
    u = c.do(op="udp_bind", addr="127.0.0.1", port=0)
    c.do(op="close", id=u["id"])
    c.do(op="close", id=t["id"])
    a.until(has("close", u["cookie"]))
    b.until(lambda seen: has("close", u["cookie"])(seen) and has("close", t["cookie"])(seen))
    assert {e["protocol"] for e in a.seen} == {"udp"} and [e["kind"] for e in a.mine(netns)] == ["bind", "close"]
    assert {e["kind"] for e in b.seen} == {"close"}
    during = agent.status()
    # no second load: the same links serve both (the namespace's sk_lookup link aside), and the
    # hooks only a stream needs (closes, UDP connects), attached while anyone streams, once
    streamed = len(during["stream_hooks"])
    assert streamed == 3 and during["links"] - links in (streamed, streamed + 1) and during["clients"] >= 2, during
    a.stop()
    b.stop()
    deadline = time.monotonic() + 10
    while (st := agent.status())["subscribers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert st["links"] == during["links"] - streamed and not st["stream_hooks"], st  # the last one gone: detached


def test_a_reader_that_falls_behind_is_dropped_and_counted(agent, netns, child_factory, streams):
    """A subscriber that never reads costs the agent its buffer (8 MiB), then is
    dropped and counted; the agent and a reading stream carry on."""
    import socket as pysocket

    from sockwatch.agent.protocol import encode_request

    dropped = agent.status()["clients_dropped"].get("slow_subscriber", 0)
    s = streams(agent.socket, "--netns", netns.name, "--kind", "close")
    with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as stuck:
        stuck.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4096)
        stuck.connect(agent.socket)
        stuck.sendall(encode_request("events"))
        time.sleep(0.5)
        c = child_factory(netns.name)
        deadline = time.monotonic() + 60 * PACE
        while time.monotonic() < deadline:
            c.do(op="burst", n=10000)  # ~20,000 events, ~8 MB of JSON lines
            if agent.status()["clients_dropped"].get("slow_subscriber", 0) > dropped:
                break
        assert agent.status()["clients_dropped"].get("slow_subscriber", 0) > dropped
        # and the one dropped is this reader: what it was sent ends in EOF
        stuck.settimeout(10 * PACE)
        while stuck.recv(1 << 20):
            pass
    # the reading stream lives on (a probe may land in what the stream's CPU budget skips
    # while the agent works off the bursts' backlog: that is reported, so try again)
    deadline = time.monotonic() + 60 * PACE
    while True:
        u = c.do(op="udp_bind", addr="127.0.0.1", port=0)
        c.do(op="close", id=u["id"])
        try:
            s.until(has("close", u["cookie"]), 5 * PACE)  # after the backlog of the bursts, read at its pace
            break
        except AssertionError:
            assert time.monotonic() < deadline, f"the reading stream showed nothing new for {60 * PACE:.0f} s"


def ring_lost(seen: list[dict]) -> int:
    return sum(e["events"] for e in seen if e["kind"] == "lost" and e["reason"] == "ring")


def test_losses_are_streamed_to_every_subscriber(netns, child_factory, tmp_path):
    """With a 16-page ring a burst loses records: each subscriber is told how many, and
    the counts add up to the kernel-side counter."""
    a = AgentProc(socket=str(tmp_path / "a.sock"), extra=("--ringbuf-pages", "16"))
    streams: list[Stream] = []
    try:
        streams += [Stream(a.socket, "--proto", "tcp"), Stream(a.socket, "--kind", "bind")]
        c = child_factory(netns.name)
        for _ in range(3):
            c.do(op="burst", n=20000)
        lost = a.status()["bpf"]["ringbuf_full"]
        assert lost > 0, "the burst did not overflow a 16-page ring: the test proves nothing"
        for s in streams:  # a filter never hides a loss
            seen = s.until(lambda seen: ring_lost(seen) >= lost, 20 * PACE)
            assert ring_lost(seen) == lost
    finally:
        for s in streams:
            s.stop()
        a.stop()


def test_a_privileged_port_refused_says_why_not_who_holds_it(agent, netns, child_factory):
    """bind() to port 80 by an unprivileged user fails with EACCES, checked before the
    port is looked at: the line says the port is privileged, not who holds it (a root
    process does)."""
    holder = child_factory(netns.name)
    holder.do(op="tcp_listen", addr="0.0.0.0", port=80)

    def fail() -> None:
        bind = "import socket\ntry: socket.socket().bind(('127.0.0.1', 80))\nexcept OSError as e: print(e.errno)"
        # the system's python3: nobody may not be able to reach this checkout's environment
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        r = subprocess.run(["ip", "netns", "exec", netns.name, *nobody, "/usr/bin/python3", "-c", bind],
                           capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert r.stdout.strip() == str(errno.EACCES), r  # what bind() really returned

    line = _first_bind_fail_line(agent, netns, fail)
    assert "BIND_FAIL tcp 127.0.0.1:80" in line and "EACCES (Permission denied)" in line, line
    assert "needs CAP_NET_BIND_SERVICE" in line and "held by" not in line, line
