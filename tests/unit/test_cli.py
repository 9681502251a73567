"""The CLI as a person meets it: clear sentences and exit codes, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import sockwatch_cmd


def run(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = sockwatch_cmd(*args)
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["snapshot", "--port", "70000"], "port 70000 is out of range"),
        (["snapshot", "--addr", "10.0.0.0/40"], "is not an IP address or CIDR"),
        (["snapshot", "--state", "sleepy"], "state 'sleepy' is not one of"),
        (["snapshot", "--proto", "icmp"], "not tcp or udp"),
        (["serve", "--ringbuf-pages", "1000"], "not a power of two"),
    ],
)
def test_bad_input_is_one_clear_sentence(args, needle):
    r = run(*args)
    assert r.returncode == 2, r
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
@pytest.mark.parametrize("args", [["snapshot", "--standalone"], ["serve", "--socket", "/tmp/sw-nonroot/a.sock"]])
def test_not_root_says_so(args):
    r = run(*args, user="65534")
    assert r.returncode == 3, r
    assert "root" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_filters():
    r = run("snapshot", "--help")
    assert r.returncode == 0
    for opt in ("--proto", "--port", "--addr", "--state", "--pid", "--netns", "--json"):
        assert opt in r.stdout


def test_status_without_agent(tmp_path):
    r = run("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode != 0 and "no sockwatch agent is running" in r.stderr


def test_snapshot_json_is_valid_without_an_agent_even_when_filtered_to_nothing(tmp_path):
    r = run("snapshot", "--json", "--port", "1", "--socket", str(tmp_path / "none.sock"))
    if r.returncode == 3:  # not root: the one sentence, checked above
        return
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
