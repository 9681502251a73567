from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import IN_CI, sockwatch_cmd
from tests.kernel import oracle

HERE = os.path.dirname(os.path.abspath(__file__))
# What a test child's process is called (ss's name for it): the name it was executed by,
# python or python3 as pytest itself was started.
CHILD_COMM = os.path.basename(sys.executable)[:15]


def _kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    try:
        from sockwatch.kernel import prereq

        prereq.require()
    except Exception as e:
        return f"BPF prerequisites missing: {e}"
    return None


@pytest.fixture(scope="session", autouse=True)
def kernel_available() -> None:
    problem = _kernel_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"kernel tests cannot run in CI: {problem}")
        pytest.skip(f"kernel tests need root and BPF: {problem}")


@dataclass
class Netns:
    name: str
    inode: int


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A network namespace of the test's own, removed afterwards by name."""
    name = f"sw-t-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Netns(name, os.stat(f"/run/netns/{name}").st_ino)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns_factory() -> Iterator:
    """Fresh namespaces on demand (one per hypothesis example), all removed by name afterwards."""
    made: list[str] = []

    def make() -> Netns:
        name = f"sw-t-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return Netns(name, os.stat(f"/run/netns/{name}").st_ino)

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Child:
    """A process of the test's that opens sockets on command (tests/kernel/sockproc.py)."""

    def __init__(self, netns: str | None = None, script: str = "sockproc.py") -> None:
        cmd = [sys.executable, os.path.join(HERE, script)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.do(op="pid")["pid"]
        assert self.pid == self.proc.pid  # ip netns exec execs in place

    def do(self, **cmd: object) -> dict:
        out = self.attempt(**cmd)
        assert "error" not in out, f"{cmd}: {out}"
        return out

    def attempt(self, **cmd: object) -> dict:
        """What the child got, errors included ({"error": strerror, "errno": n})."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _stopping_factory(cls: type) -> Iterator:
    """A fixture body: hand out cls(...) instances, stop every one of them afterwards."""
    made: list = []

    def make(*args: object) -> object:
        made.append(cls(*args))
        return made[-1]

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def child_factory() -> Iterator:
    yield from _stopping_factory(Child)


class AgentProc:
    """`sockwatch serve` as systemd would run it, on a socket of the test's own."""

    def __init__(self, socket: str | None = None, extra: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> None:
        self.own_dirs = socket is None  # directories the test chose, to clean if the agent could not
        self.socket = socket or f"/run/sockwatch-test/{uuid.uuid4().hex[:8]}/agent.sock"
        self.proc = subprocess.Popen(
            [
                *prefix,
                *sockwatch_cmd(
                    "serve", "--socket", self.socket, "--reconcile-interval", "3600", "--listen", "127.0.0.1:0", *extra
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sockwatch serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            if os.path.exists(self.socket) and self.status_or_none() is not None:
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("sockwatch serve did not become ready in 60 s")

    def status_or_none(self, reconcile: bool = False) -> dict | None:
        args = ["status", "--json", "--socket", self.socket] + (["--reconcile"] if reconcile else [])
        r = subprocess.run(sockwatch_cmd(*args), check=False, capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self, reconcile: bool = False) -> dict:
        st = self.status_or_none(reconcile)
        assert st is not None, "agent did not answer status"
        return st

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.remove_files()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.remove_files()

    def remove_files(self) -> None:
        """What a SIGKILLed agent could not remove: its socket, lock file and directory."""
        d = os.path.dirname(self.socket)
        for f in (self.socket, self.socket + ".lock"):
            if os.path.exists(f):
                os.unlink(f)
        for path in (d, os.path.dirname(d)) if self.own_dirs else ():
            try:
                os.rmdir(path)
            except OSError:
                pass


@pytest.fixture(scope="session")
def agent() -> Iterator[AgentProc]:
    a = AgentProc()
    yield a
    a.stop()


@pytest.fixture
def fresh_agent() -> Iterator:
    """Agents a test starts itself (e.g. after its sockets exist)."""
    yield from _stopping_factory(AgentProc)


def observer_links() -> int:
    """sockwatch's sk_lookup links on the host (one per hooked namespace, per agent)."""
    from sockwatch.kernel import bpflinks

    return sum(1 for _link, _prog, name in bpflinks.sk_lookup_links(None) if name == bpflinks.OBSERVER)


def expected_links(st: dict, missing: int = 0) -> int:
    """The links an agent's status should count: its hooks but the missing ones, the drop
    hook, and one sk_lookup link per namespace, every namespace it knows being hooked."""
    from sockwatch.kernel import bpfload

    hooked = (st.get("lookup") or {}).get("namespaces_hooked", 0)
    assert hooked == st["namespaces"], f"{hooked} of {st['namespaces']} namespaces hooked"
    owners = not any(note.startswith("sockops") for note in st.get("hooks_lesser", []))
    return bpfload.links_at_start(owners) - missing + hooked + len(st.get("stream_hooks", []))


def snapshot(*args: str, socket: str | None = None) -> list[dict]:
    extra = ["--socket", socket] if socket else ["--standalone"]
    r = subprocess.run(sockwatch_cmd("snapshot", "--json", *extra, *args), check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["sockets"]


def compare_with_ss(ns: Netns, socket: str | None, expect_pid: int | None = None) -> list[dict]:
    """sockwatch's view of the namespace against ss's, taken back to back while the
    test's sockets hold still. Returns sockwatch's rows."""
    ours = snapshot("--netns", str(ns.inode), socket=socket)
    theirs = oracle.ss(ns.name)
    mine = {oracle.key_of(r): r for r in ours}
    ss_keys = {r.key for r in theirs}
    missing = ss_keys - set(mine)
    extra = set(mine) - ss_keys
    assert not missing and not extra, (
        f"\nonly in ss: {sorted(map(str, missing))}\nonly in sockwatch: {sorted(map(str, extra))}"
    )
    for r in ours:
        assert r["netns"] == ns.inode
    for r in theirs:
        row = mine[r.key]
        assert r.cookie is not None, f"ss -e printed no sk: for {r.key}: is the parser still right?"
        assert row["cookie"] == r.cookie, (r.key, row)
        assert row["device"] == r.device, f"{r.key}: bound to {r.device} says ss, {row['device']} says sockwatch"
        if r.key.inode:  # it has a file, and only the test's child opens files here: ss must name it
            assert r.users, f"ss -p named no process for {r.key}: is the parser still right?"
        if r.users:
            assert (row["comm"], row["pid"]) in r.users, (
                f"{r.key}: sockwatch says {row['comm']}/{row['pid']}, ss {r.users}"
            )
        if r.key.state == "TIME-WAIT":
            assert row["pid"] is None, f"{r.key}: a TIME-WAIT socket has no file, so no owner (ss -p names none)"
        if expect_pid is not None and r.key.state != "TIME-WAIT":
            assert row["pid"] == expect_pid, (r.key, row)
    return ours


def subscribers(socket: str) -> int:
    """Streams the agent serves now (asked in process: a CLI would add its start-up)."""
    from sockwatch.agent import client

    got = client.request("status", socket)
    assert got is not None, "no agent"
    return json.loads(got[1])["subscribers"]


def wait_subscribed(socket: str, proc: subprocess.Popen, before: int) -> None:
    """Until the agent counts one subscriber more than `before`: a test acts only then
    (events before it are not streamed, and a CLI's start-up takes seconds under
    emulation, tests/vm/kernels.py)."""
    deadline = time.monotonic() + 60
    while subscribers(socket) <= before:
        assert proc.poll() is None, f"the stream exited: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "the stream did not subscribe within 60 s"
        time.sleep(0.05)
