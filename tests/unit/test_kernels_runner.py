"""The kernel runner's own plumbing (tests/vm/kernels.py), without booting anything: a run
that outlives its time is killed with everything it started, its output reaches the
log as it comes, and what the guest printed is read back into the table's row."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.vm import kernels


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, the shell, was killed first)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_run_past_its_time_is_killed_with_its_children(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    t0 = time.monotonic()
    out, status, took = kernels._timed(["sh", "-c", "sleep 60 & echo child $!; echo started; wait"], 1.0, log)
    assert status is None and took < 10 and time.monotonic() - t0 < 10
    assert "started" in out and out.endswith("kernels: timed out\n") and log.read_text() == out
    child = int(out.split("child ", 1)[1].split()[0])
    deadline = time.monotonic() + 5
    while _alive(child):  # the whole process group went, not only the shell
        assert time.monotonic() < deadline, f"{child} outlived the run"
        time.sleep(0.05)


def test_a_run_that_ends_gives_its_status_and_output(tmp_path: Path) -> None:
    out, status, _ = kernels._timed(["sh", "-c", "echo out; echo err >&2; exit 3"], 30, tmp_path / "x.log")
    assert status == 3 and "out\n" in out and "err\n" in out


def test_the_summary_reads_doctor_and_pytest() -> None:
    output = "\n".join([
        "  ok cgroup sock_release                 loads and attaches by BPF link",
        "  ok sockops (TCP listen/connect/accept/state) loads as its lesser variant",
        "  !! raw tracepoint kfree_skb (lookup misses)  refused: no BTF",
        "  ok bcc                                 0.29",
        "59 passed, 2 failed, 1 error, 4 deselected in 2901.08s",
        "SW-EXIT 1",
    ])  # fmt: skip
    run = kernels.Run("6.1.0-56-amd64", True, 1, 2901.0, output)
    got = kernels.summary(run)
    assert (got["hooks_loaded"], got["passed"], got["failed"]) == (2, 59, 3), got
    assert got["hooks_refused"] == ["raw tracepoint kfree_skb (lookup misses)"], got
