"""The systemd unit's own command, run with a notify socket the test provides (as
systemd would for Type=notify): READY=1 only once the agent answers, WATCHDOG=1 while it
runs, SIGHUP reloads the web config (RELOADING=1, then READY=1) and never ends it,
SIGTERM says STOPPING=1."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import bcrypt

from tests.conftest import ROOT

UNIT = os.path.join(ROOT, "deploy", "systemd", "sockwatch.service")


def unit_command(sock: str, extra: list[str]) -> list[str]:
    """ExecStart's arguments after the program, run by this checkout's interpreter."""
    line = next(x for x in open(UNIT) if x.startswith("ExecStart="))
    argv = shlex.split(line.split("=", 1)[1])
    assert argv[0].endswith("/bin/sockwatch") and argv[1] == "serve", argv
    args = argv[1:]
    args[args.index("--socket") + 1] = sock
    return [sys.executable, "-m", "sockwatch", *args, *extra]


def web_config(path, user: str) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    path.write_text(f"basic_auth_users:\n  {user}: '{hashed}'\n")
    os.chmod(path, 0o600)


def scrape(port: int, user: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    req.add_header("Authorization", "Basic " + __import__("base64").b64encode(f"{user}:pw".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_units_command_notifies_systemd_and_reloads_on_sighup(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(120)
    web = tmp_path / "web.yml"
    web_config(web, "alice")
    sock = str(tmp_path / "agent.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000",
           "SOCKWATCH_CONFIG": ""}  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = subprocess.Popen(unit_command(sock, ["--listen", f"127.0.0.1:{port}", "--web-config", str(web)]),
                             env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        first = notify.recv(4096).decode()
        assert first.startswith("READY=1\n") and f"MAINPID={agent.pid}" in first, first
        # ready means ready: it answers at once
        st = subprocess.run([sys.executable, "-m", "sockwatch", "status", "--json", "--socket", sock], cwd=ROOT,
                            capture_output=True, text=True, check=False, timeout=30)  # fmt: skip
        assert st.returncode == 0, st.stderr
        notify.settimeout(5)
        assert notify.recv(4096) == b"WATCHDOG=1"  # every WATCHDOG_USEC/2 at most, once a second at least
        assert scrape(port, "alice") == 200 and scrape(port, "bob") == 401
        web_config(web, "bob")
        agent.send_signal(signal.SIGHUP)
        got = []
        deadline = time.monotonic() + 10
        while got[-1:] != ["READY=1"] and time.monotonic() < deadline:
            msg = notify.recv(4096).decode()
            if msg != "WATCHDOG=1":
                got.append(msg)
        assert got == ["RELOADING=1", "READY=1"], got
        assert agent.poll() is None  # SIGHUP never ends it
        assert scrape(port, "bob") == 200 and scrape(port, "alice") == 401
        agent.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (msg := notify.recv(4096)) == b"WATCHDOG=1":
            assert time.monotonic() < deadline
        assert msg == b"STOPPING=1"
        assert agent.wait(20) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        notify.close()
