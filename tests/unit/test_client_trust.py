"""The CLI does not believe whatever answers on a socket: an explicit --socket must be a
live agent's, the agent must be root, malformed answers are one clear error, and strings
from the wire reach the terminal escaped. Fake agents here are threads of the test."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import sockwatch_cmd

ROW = {
    "cookie": 7, "protocol": "tcp", "family": "ipv4", "state": "LISTEN", "local_address": "127.0.0.1",
    "local_port": 80, "remote_address": None, "remote_port": None, "netns": 4026531840, "inode": 1,
    "pid": 1, "comm": "evil\x1b]0;pwned\x07\x1b[2J", "uid": 0, "owner_source": "hook",
}  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(sockwatch_cmd(*args), check=False, capture_output=True, text=True, timeout=60)


@pytest.fixture
def fake_agent(tmp_path) -> Iterator:
    """start(answer_bytes) -> socket path; serves that answer to every connection."""
    servers = []

    def start(answer: bytes) -> str:
        path = str(tmp_path / f"fake{len(servers)}.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4)
        servers.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    try:
                        conn.recv(65536)
                        conn.sendall(answer)
                    except OSError:
                        pass  # the client gave up first (an answer too long for it): serve the next one

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield start
    for srv in servers:
        srv.close()


@pytest.mark.parametrize("kind", ["file", "dir", "missing"])
def test_an_explicit_socket_that_is_not_an_agent_is_an_error(tmp_path, kind):
    path = tmp_path / "x.sock"
    if kind == "file":
        path.write_text("")
    elif kind == "dir":
        path.mkdir()
    for cmd in (["snapshot"], ["snapshot", "--json"], ["status"]):
        r = run(*cmd, "--socket", str(path))
        assert r.returncode == 4 and r.stdout == "", r  # not a silent standalone snapshot
        assert r.stderr.startswith("sockwatch: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", ["", "rel.sock", "/proc/x"])
def test_a_bad_socket_path_is_one_sentence(bad):
    for cmd in ("snapshot", "status"):
        r = run(cmd, "--socket", bad)
        assert r.returncode == 4 and "Traceback" not in r.stderr and r.stderr.count("\n") <= 2, r


@pytest.mark.parametrize(
    "answer",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"ok": "yes"}\n',
        b'{"ok": true, "schema_version": 1}\n{"rows": [',
        b'{"ok": true, "schema_version": 1}\n[{"cookie": "x"}]',
        b'{"ok": true}\n[]',  # an agent of another version: said so, in one sentence
        b'{"ok": true, "schema_version": 99, "agent_version": "\\u001b[2J9.9"}\n[]',
        b"[" * 100000 + b"\n",
        b"",
    ],
)
def test_malformed_answers_are_one_clear_error(fake_agent, answer):
    path = fake_agent(answer)
    for cmd in (["snapshot"], ["status"]):
        r = run(*cmd, "--socket", path)
        assert r.returncode == 4 and "Traceback" not in r.stderr and r.stderr.startswith("sockwatch: "), r


def test_strings_from_the_wire_reach_the_terminal_escaped(fake_agent):
    path = fake_agent(b'{"ok": true, "schema_version": 1}\n' + json.dumps([ROW]).encode())
    r = run("snapshot", "--socket", path)
    assert r.returncode == 0, r
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "evil\\x1b]0;pwned\\x07" in r.stdout
    refusal = fake_agent(b'{"ok": false, "schema_version": 1, "error": "no\\u001b[2J"}\n')
    r = run("snapshot", "--socket", refusal)
    assert r.returncode == 4 and "\x1b" not in r.stderr, r


def test_the_terminal_table_escapes_process_names_and_reads_no_markup():
    import io

    from sockwatch.model import SockRow
    from sockwatch.render import print_table

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    print_table([SockRow.from_dict(ROW | {"comm": "[bold red]x[/]\x1b]0;pwned\x07"})], out)
    text = out.getvalue()
    assert "\x1b]0;pwned" not in text and "[bold red]x[/]" in text and "\\x1b]0;pwned" in text


def test_what_is_not_known_is_one_dash_in_the_table():
    from sockwatch.model import SockRow
    from sockwatch.render import UNKNOWN, cells

    row = SockRow.from_dict(ROW | {"pid": None, "comm": None, "uid": None, "inode": None, "container": None})
    got = cells(row)
    assert UNKNOWN == "-" and got[5:9] == ("-", "-", "-", "-") and got[-1] == "-", got
    assert "" not in got
