"""Missing prerequisites, made real in a private mount namespace (the host's mounts are
untouched): one sentence and what to do, a non-zero exit, nothing left behind, and the
degraded path (`snapshot --standalone`, no BPF) still works."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess

import pytest

from sockwatch.kernel import prereq
from tests.conftest import sockwatch_cmd

HERE = os.path.dirname(os.path.abspath(__file__))
HIDE_HEADERS = f"mount -t tmpfs none /lib/modules/{platform.release()}"


def hide_cgroup2() -> str:
    where = prereq.cgroup2_path()
    assert where is not None
    return f"umount -l {shlex.quote(where)}"


def in_private_mounts(hide: str, *args: str) -> subprocess.CompletedProcess:
    cmd = " ".join(shlex.quote(a) for a in sockwatch_cmd(*args))
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{hide} && exec {cmd}"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("hide", "needle"),
    [(HIDE_HEADERS, "no kernel headers for"), (None, "no cgroup v2 mount")],
    ids=["no-headers", "no-cgroup2"],
)
def test_a_missing_prerequisite_is_one_sentence_and_standalone_still_works(hide, needle, tmp_path):
    hide = hide or hide_cgroup2()
    r = in_private_mounts(hide, "serve", "--socket", str(tmp_path / "a.sock"))
    assert r.returncode == 3 and needle in r.stderr and "Traceback" not in r.stderr, r
    assert "snapshot --standalone" in r.stderr  # what still works
    assert not list(tmp_path.iterdir()), "a refused start left files"
    r = in_private_mounts(hide, "snapshot", "--standalone", "--json", "--port", "1")
    assert r.returncode == 0 and json.loads(r.stdout)["sockets"] == [], r


def test_no_bpf_is_one_sentence_and_standalone_still_works(tmp_path):
    """bpf() refused by a seccomp filter, as in a container that does not allow it."""
    nobpf = tmp_path / "nobpf"
    subprocess.run(["gcc", "-O2", "-o", str(nobpf), os.path.join(HERE, "nobpf.c")], check=True)
    r = subprocess.run([str(nobpf), *sockwatch_cmd("serve", "--socket", str(tmp_path / "s" / "a.sock"))],
                       capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert r.returncode == 3 and "the kernel refuses bpf(): Operation not permitted" in r.stderr, r
    assert "seccomp" in r.stderr and "snapshot --standalone" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists(), "a refused start left files"
    r = subprocess.run([str(nobpf), *sockwatch_cmd("snapshot", "--standalone", "--json", "--port", "1")],
                       capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["sockets"] == [], r


def test_without_tracefs_the_bind_tracepoint_still_attaches_and_nothing_is_mounted(tmp_path):
    """A fresh machine has no tracefs mounted: the tracepoint's id and the drop reasons
    come from one private mount namespace (one child, counted through a shim on PATH),
    and the host (here: this test's own mount namespace) stays as it was."""
    shim, calls = tmp_path / "unshare", tmp_path / "calls"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {shutil.which("unshare")} "$@"\n')
    shim.chmod(0o755)
    # tracefs is also where debugfs is mounted (the kernel runner's guests mount it)
    gone = "umount /sys/kernel/tracing; umount /sys/kernel/debug/tracing; umount /sys/kernel/debug"
    hide = f"({gone}; true) 2>/dev/null && export PATH={tmp_path}:$PATH"
    r = in_private_mounts(hide, "doctor")
    line = next(x for x in r.stdout.splitlines() if "tracepoint sys_exit_bind" in x)
    assert line.lstrip().startswith("ok"), r.stdout
    line = next(x for x in r.stdout.splitlines() if "raw tracepoint kfree_skb" in x)
    assert line.lstrip().startswith("ok"), r.stdout  # the drop reasons were read too
    assert "tracefs is not mounted" in r.stdout and "Traceback" not in r.stderr
    spawned = calls.read_text().splitlines() if calls.exists() else []
    assert len(spawned) == 1, spawned
