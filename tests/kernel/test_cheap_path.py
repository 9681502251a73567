"""TCP connections cost the agent nothing per connection while nobody streams: their
records do not reach it at all (the hooks count them in the kernel), yet the table a
view reads equals ss's, TIME-WAIT rows included, with owners; while a subscriber streams,
every connection's records reach it, and they stop again when it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from tests.conftest import PACE, sockwatch_cmd
from tests.kernel.conftest import AgentProc, Netns, compare_with_ss
from tests.kernel.test_events import Stream

# Closed by FIN, the server first, as a web server closing a request does: the server's
# end stays in TIME-WAIT. The listener stays open until stdin closes.
CHURN = """
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket()
l.bind(("127.0.0.1", port))
l.listen(512)
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = l.accept()
    s.close()
    c.close()
print("done", flush=True)
sys.stdin.read()
"""


class Churn:
    def __init__(self, ns: Netns, n: int, port: int, client_first: bool = False) -> None:
        code = CHURN.replace("    s.close()\n    c.close()", "    c.close()\n    s.close()") if client_first else CHURN
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", code, str(n), str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "done"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def counters(agent: AgentProc) -> tuple[int, int]:
    """(records that reached the agent, TCP connections the hooks saw opened)."""
    bpf = agent.status()["bpf"]
    return bpf["events"], bpf["tcp_opened"]


def wait_for(agent: AgentProc, opened_at_least: int) -> tuple[int, int]:
    deadline = time.monotonic() + 10 * PACE
    while (got := counters(agent))[1] < opened_at_least:
        assert time.monotonic() < deadline, f"the hooks saw {got[1]} connections opened, not {opened_at_least}"
        time.sleep(0.1)
    return got


def test_connections_reach_the_agent_only_while_streamed_and_the_table_is_still_the_kernels(
    netns: Netns, agent: AgentProc
) -> None:
    n = 1000
    records0, opened0 = counters(agent)
    churn = Churn(netns, n, 7300)
    try:
        records1, _ = wait_for(agent, opened0 + 2 * n)  # both ends of each connection
        # the listener's bind and listen, and the test's own status queries: nothing per connection
        assert records1 - records0 < 20, f"{records1 - records0} records reached the agent for {n} connections"
        rows = compare_with_ss(netns, agent.socket)  # TIME-WAIT rows included, exactly ss's
        states = [r["state"] for r in rows]
        # the server closed first: its ends wait in TIME-WAIT (the kernel recycles the odd one
        # whose 4-tuple a later connect() reuses, so ss, not n, is the count to equal)
        assert states.count("TIME-WAIT") > n // 2 and states.count("LISTEN") == 1, sorted(set(states))
        (lst,) = [r for r in rows if r["state"] == "LISTEN"]
        assert lst["owner_source"] == "hook"

        # a subscriber that streams connections: now every record crosses
        s = Stream(agent.socket, "--netns", str(netns.inode), "--kind", "connect", "--kind", "accept")
        try:
            churn2 = Churn(netns, 50, 7301)
            churn2.stop()
            seen = s.until(lambda seen: len([e for e in seen if e["kind"] in ("connect", "accept")]) >= 100)
            connects = [e for e in seen if e["kind"] == "connect"]
            assert len(connects) == 50 and all(e["pid"] == churn2.proc.pid for e in connects), connects[:3]
        finally:
            s.stop()
        records2, _ = counters(agent)
        assert records2 - records1 >= 50 * 6  # connect, accept and the state changes of both ends

        # and it stops when the subscriber leaves
        deadline = time.monotonic() + 5 * PACE
        while agent.status()["subscribers"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        records2, opened2 = counters(agent)
        churn3 = Churn(netns, 300, 7302)
        churn3.stop()
        records3, _ = wait_for(agent, opened2 + 600)
        assert records3 - records2 < 20, f"{records3 - records2} records for 300 connections after the stream ended"
    finally:
        churn.stop()


def test_a_connect_names_its_owner_from_the_hooks_log(netns: Netns, agent: AgentProc, child_factory) -> None:
    """The owner of a connect()ed socket is the one connect4/6 logged, an accepted
    one's its listener's: both before any /proc look."""
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=7400)
    conn = c.do(op="tcp_connect", addr="127.0.0.1", port=7400, accept_on=lst["id"])
    rows = {r["cookie"]: r for r in compare_with_ss(netns, agent.socket, expect_pid=c.pid)}
    assert rows[conn["cookie"]]["owner_source"] == "hook"
    assert rows[conn["accepted"]["cookie"]]["owner_source"] == "listener"


def stats_fds(pid: int) -> int:
    """The agent's BPF_ENABLE_STATS descriptors (anon_inode:bpf-stats)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-stats"
        except OSError:
            pass
    return n


def test_bpf_stats_count_the_hooks_runs_only_for_the_window_asked(netns: Netns, agent: AgentProc) -> None:
    assert stats_fds(agent.proc.pid) == 0
    out: dict = {}

    def ask() -> None:
        r = subprocess.run(sockwatch_cmd("status", "--json", "--bpf-stats", "2", "--socket", agent.socket),
                           capture_output=True, text=True, check=True)  # fmt: skip
        out.update(json.loads(r.stdout))

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.5 * PACE)
    Churn(netns, 200, 7500).stop()  # while the window is open
    t.join(30 * PACE)
    window = out["bpf_programs_window"]
    sockops = next(w for what, w in window.items() if what.startswith("sockops"))
    assert sockops["runs_per_second"] * 2 >= 200 * 2, window  # at least the two opens of each connection
    assert sockops["ns_per_run"] and 0 < sockops["ns_per_run"] < 1_000_000
    deadline = time.monotonic() + 10 * PACE
    while stats_fds(agent.proc.pid):  # the window closes on the agent's next tick after it ends
        assert time.monotonic() < deadline, "the agent kept the kernel's BPF stats on"
        time.sleep(0.2)
    r = subprocess.run(sockwatch_cmd("status", "--bpf-stats", "999", "--socket", agent.socket), capture_output=True,
                       text=True, check=False)  # fmt: skip
    assert r.returncode != 0 and "1 to 300" in r.stderr and "Traceback" not in r.stderr


def test_time_wait_is_the_kernels_after_a_ring_overflow_and_after_a_restart(netns: Netns, tmp_path) -> None:
    """A resync after lost records, or a start after kill -9, leaves the table equal to
    the kernel's, TIME-WAIT included, and `ports` counts the kernel's TIME-WAIT on
    ephemeral ports (the clients close first here: theirs are the TIME-WAIT ends)."""
    import signal

    from tests.conftest import sockwatch_cmd as cmd
    from tests.kernel.conftest import snapshot

    def time_waits(socket: str) -> int:
        rows = snapshot("--netns", str(netns.inode), socket=socket)
        return sum(1 for r in rows if r["state"] == "TIME-WAIT")

    def ports_time_wait(socket: str) -> int:
        r = subprocess.run(cmd("ports", "--json", "--netns", str(netns.inode), "--socket", socket),
                           capture_output=True, text=True, check=True)  # fmt: skip
        return sum(p["time_wait"] for p in json.loads(r.stdout)["pressure"])

    def kernel_time_waits() -> int:
        out = subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-Htan", "state", "time-wait"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return out.count("\n")

    a = AgentProc(socket=str(tmp_path / "a.sock"), extra=("--ringbuf-pages", "16"))
    b: AgentProc | None = None
    stream: Stream | None = None
    churn: list[Churn] = []
    try:
        stream = Stream(a.socket, "--proto", "tcp")  # connections' records cross while someone streams
        a.proc.send_signal(signal.SIGSTOP)  # the agent cannot read: a 16-page ring overflows
        try:
            churn.append(Churn(netns, 2000, 7411, client_first=True))
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert a.status()["bpf"]["ringbuf_full"] > 0, "nothing was lost: the test proves nothing"
        compare_with_ss(netns, a.socket)
        tw = kernel_time_waits()
        assert tw >= 1900 and time_waits(a.socket) == tw and ports_time_wait(a.socket) == tw
        stream.stop()
        stream = None
        # kill -9 under churn, then a new agent: no TIME-WAIT row of the old one's survives
        killer = threading.Timer(0.3, a.kill)
        killer.start()
        churn.append(Churn(netns, 2000, 7412, client_first=True))
        killer.join()
        b = AgentProc(socket=str(tmp_path / "b.sock"))
        compare_with_ss(netns, b.socket)
        tw = kernel_time_waits()
        assert tw >= 3800 and time_waits(b.socket) == tw and ports_time_wait(b.socket) == tw
    finally:
        if stream is not None:
            stream.stop()
        for c in churn:
            c.stop()
        a.stop()
        if b is not None:
            b.stop()


# The client closes and the server never does: the client's end waits in FIN-WAIT-2,
# an orphan the kernel keeps as a timewait socket until tcp_fin_timeout.
HALF_CLOSED = """
import socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 7420))
l.listen()
c = socket.create_connection(("127.0.0.1", 7420))
s, _ = l.accept()
c.close()
print("done", flush=True)
sys.stdin.read()
"""


def test_a_fin_wait_2_orphan_leaves_the_table_when_the_kernel_drops_it(netns: Netns, agent: AgentProc) -> None:
    """A timewait socket in FIN-WAIT-2 (not only TIME-WAIT) goes when its timer ends,
    with no state change for a hook to count: the table lets it go at that time too."""
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw", "net.ipv4.tcp_fin_timeout=2"], check=True)
    p = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", HALF_CLOSED],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "done"
        rows = compare_with_ss(netns, agent.socket)
        assert [r["state"] for r in rows if r["local_port"] != 7420] == ["FIN-WAIT-2"]
        deadline = time.monotonic() + 10 * PACE
        while "FIN-WAIT-2" in subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-Htan"],
                                             capture_output=True, text=True, check=True).stdout:  # fmt: skip
            assert time.monotonic() < deadline, "the kernel kept the orphan: the test proves nothing"
            time.sleep(0.2)
        rows = compare_with_ss(netns, agent.socket)
        assert "FIN-WAIT-2" not in [r["state"] for r in rows]
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(10)
