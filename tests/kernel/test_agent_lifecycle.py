"""The agent's life: sockets from before it started, SIGKILL leaving nothing attached,
one agent per socket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import AgentProc, compare_with_ss, expected_links


def bpftool(*args: str) -> list[dict]:
    r = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout or "[]")


def links_held_by(pid: int) -> set[int]:
    """The ids of the BPF links a process holds, from its descriptors' fdinfo."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("link_id:"):
                    held.add(int(line.split()[1]))
    return held


def test_sockets_from_before_the_agent_started(netns, child_factory, fresh_agent):
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=6000)
    c.do(op="tcp_connect", addr="127.0.0.1", port=6000, accept_on=lst["id"])
    c.do(op="udp_connect", addr="127.0.0.1", port=6001)
    agent = fresh_agent()
    rows = compare_with_ss(netns, agent.socket, expect_pid=c.pid)
    assert {r["owner_source"] for r in rows} == {"proc"}  # the /proc scan at start found them
    # and what happens to them afterwards is followed by the hooks
    c.do(op="close", id=lst["id"])
    new = c.do(op="udp_bind", addr="127.0.0.1", port=6002)
    rows = compare_with_ss(netns, agent.socket, expect_pid=c.pid)
    assert next(r for r in rows if r["cookie"] == new["cookie"])["owner_source"] == "hook"


def test_sigkill_leaves_nothing_attached(fresh_agent):
    agent: AgentProc = fresh_agent()
    st = agent.status()
    n = expected_links(st)
    assert st["links"] == n
    held = links_held_by(agent.proc.pid)  # this agent's, whatever other agents run
    links = [link for link in bpftool("link", "show") if link["id"] in held]
    assert len(links) == n and len(held) == n, (links, held)
    progs = {p["id"]: p for p in bpftool("prog", "show")}
    assert all(progs[link["prog_id"]]["name"].startswith("sw_") for link in links), links
    our_progs = {link["prog_id"] for link in links}
    # no perf-event attachments at all: the one raw tracepoint's descriptor is a link too
    assert not [p for p in bpftool("perf") if p.get("pid") == agent.proc.pid and p.get("prog_id") not in our_progs]
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # programs are freed by an RCU callback, not at once
        left_links = {link["id"] for link in bpftool("link", "show")} & {link["id"] for link in links}
        left_progs = {p["id"] for p in bpftool("prog", "show")} & our_progs
        if not left_links and not left_progs:
            break
        time.sleep(0.2)
    assert not left_links, f"links left after SIGKILL: {left_links}"
    assert not left_progs, f"programs left after SIGKILL: {left_progs}"
    attached = {p["id"] for cg in bpftool("cgroup", "tree") for p in cg.get("programs", [])}
    assert not (attached & our_progs), f"cgroup attachments left after SIGKILL: {attached & our_progs}"
    perf = bpftool("perf")
    assert not [p for p in perf if p.get("pid") == agent.proc.pid], perf
    # what systemd does next: a new agent on the dead one's (stale) socket starts and serves
    assert os.path.exists(agent.socket)
    again = fresh_agent(agent.socket)
    st = again.status()
    assert st["links"] == expected_links(st)


def test_snapshot_without_an_agent_filtered_to_nothing_is_an_empty_array():
    r = subprocess.run(
        sockwatch_cmd("snapshot", "--json", "--port", "1", "--standalone"),
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sockets"] == []


def test_second_agent_on_the_same_socket_is_refused(fresh_agent):
    agent = fresh_agent()
    r = subprocess.run(
        sockwatch_cmd("serve", "--socket", agent.socket), check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert f"pid {agent.proc.pid}" in r.stderr and "Traceback" not in r.stderr


def _our_bpf_objects() -> tuple[set[int], set[int]]:
    progs = {p["id"] for p in bpftool("prog", "show") if p.get("name", "").startswith("sw_")}
    links = {link["id"] for link in bpftool("link", "show") if link.get("prog_id") in progs}
    return progs, links


def test_signals_at_any_moment_of_start_up_leave_nothing(fresh_agent, tmp_path):
    """SIGTERM, SIGINT (Ctrl-C) and SIGKILL while the agent compiles, attaches and
    bootstraps, and once it serves with a client connected: nothing of it stays in the
    kernel, SIGTERM/SIGINT exit promptly, and a new agent then starts on the same path.
    Another agent may run (the suite's own, in another order): only what appears after
    this test started counts, and that agent adds nothing meanwhile (no new namespace)."""
    before_progs, before_links = _our_bpf_objects()

    def left() -> tuple[set[int], set[int]]:
        progs, links = _our_bpf_objects()
        return progs - before_progs, links - before_links

    path = f"/run/sockwatch-test/sig-{os.getpid()}/agent.sock"
    # The moments are sockwatch's own start-up, at this machine's pace (under emulation,
    # tests/vm/kernels.py, it is ten times slower): counted from when the interpreter has
    # run site (a signal before that is CPython's to handle), in fractions of one start.
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    python_up = time.monotonic() - t0
    t0 = time.monotonic()
    first = fresh_agent(path)
    start = time.monotonic() - t0 - python_up
    compile_s = first.status()["load_seconds"]
    first.stop()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            for part in (0.1, 0.4, 0.8):
                delay = python_up + part * start
                proc = subprocess.Popen(sockwatch_cmd("serve", "--socket", path), stderr=subprocess.PIPE, text=True)
                time.sleep(delay)
                t0 = time.monotonic()
                proc.send_signal(sig)
                proc.wait(max(10, 3 * start))
                took = time.monotonic() - t0
                err = proc.stderr.read() if proc.stderr else ""
                assert "Traceback" not in err, err
                if sig != signal.SIGKILL:  # bcc's compile is one C call: a signal waits for it at most
                    assert took < max(3.0, 1.5 * compile_s), f"{sig.name} at {delay:.1f}s took {took:.1f}s"
                deadline = time.monotonic() + 10
                while left() != (set(), set()):  # programs go by RCU, not at once
                    assert time.monotonic() < deadline, f"{sig.name} at {delay}s left {left()}"
                    time.sleep(0.2)
        # serving, with a client connected and silent: SIGTERM within a second, then a restart serves
        a = fresh_agent(path)
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(path)
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(5)
        idle.close()
        assert time.monotonic() - t0 < 1.0
        again = fresh_agent(path)
        st = again.status()
        assert st["links"] == expected_links(st)
        again.stop()
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # the killed agents' directory: the test chose it
        with contextlib.suppress(OSError):  # and its parent, if no other test's is in it
            os.rmdir(os.path.dirname(os.path.dirname(path)))


def test_exporter_flags_and_every_address(fresh_agent):
    """node_exporter's spelling is accepted (--web.listen-address), and :PORT listens on
    every address, IPv4 and IPv6, as exporters do."""
    import re
    import urllib.request

    a = fresh_agent(None, ("--web.listen-address", ":0"))
    url = a.status()["metrics"]
    m = re.fullmatch(r"http://\[::\]:(\d+)/metrics", url)
    assert m, url
    for host in ("127.0.0.1", "[::1]"):
        with urllib.request.urlopen(f"http://{host}:{m.group(1)}/healthz", timeout=10) as r:
            assert r.status == 200
    # what every exporter has: process_* and the build's revision, OpenMetrics when asked for
    req = urllib.request.Request(f"http://127.0.0.1:{m.group(1)}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    assert text.endswith("# EOF\n")
    assert re.search(r"^process_resident_memory_bytes \S+$", text, re.M), text[:500]
    assert re.search(r'^sockwatch_build_info\{revision="[0-9a-f]{12}",version="[^"]+"\} 1\.0$', text, re.M)
