"""`sockwatch live` in a real terminal: tmux runs it at 80x24, the test sends keys and
reads the screen. A socket the test opens appears, goes after close; the filter, view
and quit keys work; quitting gives the shell its terminal back."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import PACE, sockwatch_cmd
from tests.kernel.conftest import CHILD_COMM, observer_links


class Terminal:
    def __init__(self, cmd: list[str], width: int = 80, height: int = 24) -> None:
        self.name = f"sw-live-{uuid.uuid4().hex[:8]}"
        # the terminal says its size: a COLUMNS or LINES inherited from the test run must not
        run = " ".join(shlex.quote(c) for c in cmd)
        line = f"env -u COLUMNS -u LINES {run}; echo SOCKWATCH-EXITED rc=$?; sleep 60"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), line],
                       check=True)  # fmt: skip
        # a tmux server that already runs may size new windows its own way
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(width), "-y", str(height)], check=True)

    def screen(self) -> str:
        r = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True, check=True)
        return r.stdout

    # at a person's pace: keys that arrive in one read with a screen change can land on
    # the screen before or after it
    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)
        time.sleep(0.2)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        time.sleep(0.2)

    def until(self, ok: Callable[[str], bool], timeout: float = 15) -> str:
        timeout *= PACE  # the app's work at this machine's pace (a QEMU guest's: 10x slower)
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if ok(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen did not show it within {timeout}s:\n{s}")
            time.sleep(0.1)

    def live_pid(self) -> int:
        """The sockwatch process (the pane's shell runs it as its child)."""
        out = subprocess.run(["tmux", "display", "-p", "-t", self.name, "#{pane_pid}"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        shell = int(out.stdout)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{shell}/task/{shell}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise AssertionError("no sockwatch process under the pane's shell")

    def close(self) -> None:
        """Kill the session; the live process must go with its terminal (SIGHUP)."""
        try:
            pid: int | None = self.live_pid()
        except (AssertionError, OSError, ValueError, subprocess.CalledProcessError):
            pid = None
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False, capture_output=True)
        if pid is not None and not gone(pid, 6):
            os.kill(pid, 9)
            raise AssertionError(f"sockwatch live (pid {pid}) outlived its terminal")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    made: list[Terminal] = []

    def make(*args: str, width: int = 80, height: int = 24) -> Terminal:
        t = Terminal(sockwatch_cmd("live", *args), width, height)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def test_live_shows_a_socket_come_and_go_and_its_keys_work_at_80x24(agent, netns, child_factory, terminal):
    t = terminal("--socket", agent.socket, "--refresh", "0.3")
    t.until(lambda s: "sockwatch live" in s and "[1] Listeners+UDP" in s and "q quit" in s)
    assert max(len(line) for line in t.screen().splitlines()) <= 80
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=47123)
    # / filter, in snapshot's language: only that port
    t.keys("/")
    t.until(lambda s: "filter (Enter applies" in s)
    t.type("port=47123")
    t.keys("Enter")
    s = t.until(lambda s: "127.0.0.1:47123" in s and "filter: port=47123" in s and "rows 1-1 of 1" in s)
    row = next(line for line in s.splitlines() if "127.0.0.1:47123" in line)
    assert "LISTEN" in row and str(c.pid) in row and CHILD_COMM in row and str(netns.inode) in row, row
    c.do(op="close", id=lst["id"])
    t.until(lambda s: "rows 0-0 of 0" in s and "LISTEN  127.0.0.1:47123" not in s)
    # 2: connections; a connection to a fresh listener shows with both ends
    srv = c.do(op="tcp_listen", addr="127.0.0.1", port=47124)
    conn = c.do(op="tcp_connect", addr="127.0.0.1", port=47124, accept_on=srv["id"])
    t.keys("/")
    t.until(lambda s: "filter (Enter applies" in s and "port=47123" in s)
    t.keys("C-u")
    t.type("port=47124")
    t.keys("Enter")
    t.keys("2")
    s = t.until(lambda s: "[2] Connections" in s and f"127.0.0.1:{conn['local'][1]}" in s)
    assert "ESTAB" in s
    # 3: processes; 4: events (the stream, newest first)
    t.keys("3")
    t.until(lambda s: "[3] Processes" in s and CHILD_COMM in s)
    t.keys("4")
    c.do(op="close", id=conn["id"])
    t.until(lambda s: "[4] Events" in s and "CLOSE" in s and "127.0.0.1:47124" in s)
    # 5: UDP peers (the sk_lookup hook): a datagram to a UDP socket names its sender
    c.do(op="udp_bind", addr="127.0.0.1", port=47126)
    sender = c.do(op="udp_sendto", addr="127.0.0.1", port=47126)
    t.keys("/")
    t.until(lambda s: "filter (Enter applies" in s)
    t.keys("C-u")
    t.type("port=47126")
    t.keys("Enter")
    t.keys("5")
    s = t.until(lambda s: "[5] UDP peers" in s and f"127.0.0.1:{sender['local'][1]}" in s)
    row = next(line for line in s.splitlines() if f"127.0.0.1:{sender['local'][1]}" in line)
    assert "127.0.0.1:47126" in row and str(c.pid) in row, row
    # 6: drops: a UDP socket that never reads, its buffer full, names the reason and its owner
    c.do(op="udp_bind", addr="127.0.0.1", port=47127, rcvbuf=1024)
    c.do(op="udp_flood", addr="127.0.0.1", port=47127, n=100)
    t.keys("/")
    t.until(lambda s: "filter (Enter applies" in s)
    t.keys("C-u")
    t.type("port=47127")
    t.keys("Enter")
    t.keys("6")
    s = t.until(lambda s: "[6] Sockets that dropped" in s and "127.0.0.1:47127" in s and "SOCKET_RCVBUFF" in s)
    row = next(line for line in s.splitlines() if "127.0.0.1:47127" in line)
    assert str(c.pid) in row and "rcvbuf" in row, row
    # ? help, then q quits and the shell has its terminal back
    t.keys("?")
    t.until(lambda s: "sockwatch live: keys" in s)
    t.keys("Escape")
    t.until(lambda s: "sockwatch live: keys" not in s)
    t.keys("q")
    s = t.until(lambda s: "SOCKWATCH-EXITED rc=0" in s)
    assert "sockwatch live ·" not in s  # the alternate screen is gone


def test_ctrl_c_and_sigterm_restore_the_terminal(agent, terminal):
    t = terminal("--socket", agent.socket, "--refresh", "0.3", width=140, height=40)
    t.until(lambda s: "[1] Listeners+UDP" in s and "COOKIE" in s)  # a wide terminal gets more columns
    t.keys("C-c")
    s = t.until(lambda s: "SOCKWATCH-EXITED rc=0" in s)
    assert "sockwatch live ·" not in s
    t2 = terminal("--socket", agent.socket, "--refresh", "0.3")
    t2.until(lambda s: "[1] Listeners+UDP" in s)
    os.kill(t2.live_pid(), signal.SIGTERM)
    s = t2.until(lambda s: "SOCKWATCH-EXITED" in s, 5)
    assert "sockwatch live ·" not in s


def test_live_goes_with_its_terminal(agent, terminal):
    """A closed terminal (SIGHUP) ends it: nothing left spinning on a dead tty."""
    t = terminal("--socket", agent.socket, "--refresh", "0.3")
    t.until(lambda s: "[1] Listeners+UDP" in s)
    t.close()  # asserts the process is gone within 6 s


def test_live_refuses_a_pipe_and_bad_options():
    for args, needle in (
        ([], "needs a terminal"),
        (["--refresh", "0"], "out of range: 0.1 to 60"),
        (["--view", "nope"], "--view must be one of"),
    ):
        r = subprocess.run(sockwatch_cmd("live", *args), capture_output=True, text=True, check=False, timeout=30)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r


def bpf_links() -> int:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    import json

    return len(json.loads(out or "[]"))


def _settled_links() -> tuple[int, int]:
    """(links, sockwatch's sk_lookup links) once unchanged for 1.5 s: an agent another
    test started hooks a new namespace within a second of its creation."""
    last, since = (-1, -1), time.monotonic()
    while True:
        now = (bpf_links(), observer_links())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.5:
            return now
        time.sleep(0.25)


def test_with_no_agent_it_runs_one_in_process_and_leaves_nothing(netns, child_factory, terminal):
    from sockwatch.agent.inprocess import agent_running
    from sockwatch.kernel import bpfload

    assert not agent_running(None), "an agent serves the default path: this test needs none there"
    before, observers_before = _settled_links()
    dirs = {d for d in os.listdir("/run") if d.startswith("sockwatch-")}
    t = terminal("--refresh", "0.3", "--filter", "port=47125")
    t.until(lambda s: "in-process agent" in s and "[1] Listeners+UDP" in s, 60)
    links, observers = _settled_links()
    assert links == before + bpfload.links_at_start() + observers - observers_before
    c = child_factory(netns.name)
    c.do(op="udp_bind", addr="127.0.0.1", port=47125)
    t.until(lambda s: "udp4   UNCONN  127.0.0.1:47125" in s)
    t.keys("q")
    t.until(lambda s: "SOCKWATCH-EXITED rc=0" in s)
    assert _settled_links() == (before, observers_before)  # every link went with the process
    assert {d for d in os.listdir("/run") if d.startswith("sockwatch-")} == dirs


def test_an_explicit_socket_with_no_agent_is_one_sentence_not_a_blank_screen(terminal, tmp_path):
    """As every other command: an explicit --socket must be an agent's (no silent
    in-process agent, no empty screen that exits 0 on q)."""
    t = terminal("--socket", str(tmp_path / "missing.sock"))
    screen = t.until(lambda s: "SOCKWATCH-EXITED" in s)
    assert "there is no agent socket at" in screen and "rc=0" not in screen, screen
    assert "Traceback" not in screen
