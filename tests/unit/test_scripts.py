"""The README's commands as a user without root: they ask for sudo (keeping the settings
the scripts read) or, with no sudo, say so in one sentence."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("run.sh", "test.sh", "bench.sh", "install.sh")


def _as_nobody(cmd: list[str], path: str) -> subprocess.CompletedProcess:
    prefix = (
        [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if os.geteuid() == 0
        else []
    )
    env = {"PATH": path, "CI": "true", "HOME": "/"}
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=False, env=env, cwd=ROOT, timeout=60)


@pytest.fixture
def bin_dir() -> Iterator[str]:
    """A PATH of bash and the coreutils the scripts use, but no sudo, that another user
    can read (pytest's own temporary directories are root's alone)."""
    d = tempfile.mkdtemp(prefix="sw-t-bin-")
    try:
        os.chmod(d, 0o755)
        for tool in ("bash", "id", "basename", "dirname", "env"):
            found = shutil.which(tool)
            assert found, tool
            os.symlink(found, os.path.join(d, tool))
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_root_or_sudo_it_says_so(script: str, bin_dir: str) -> None:
    r = _as_nobody(["bash", f"scripts/{script}", "snapshot"], bin_dir)
    assert r.returncode == 3, r
    said = f"{script}: run as root: it installs Debian packages and loads BPF programs (no sudo here)"
    assert r.stderr.strip() == said


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_root_it_asks_sudo_keeping_the_settings(script: str, bin_dir: str) -> None:
    fake = os.path.join(bin_dir, "sudo")
    with open(fake, "w") as f:
        f.write('#!/bin/sh\necho "sudo $*"\n')  # says how it was asked, and runs nothing
    os.chmod(fake, 0o755)
    r = _as_nobody(["bash", f"scripts/{script}", "snapshot", "--json"], bin_dir)
    assert r.returncode == 0, r
    assert r.stdout.strip() == (
        f"sudo --preserve-env=CI,SOCKWATCH_VENV,SOCKWATCH_EXTRAS,SOCKWATCH_SOCKET -- scripts/{script} snapshot --json"
    )
