"""The kernel runner itself works: it boots Debian's 6.1 kernel under QEMU (software
emulation) with this machine's filesystem, and a short kernel test passes inside, where
sockops must take its lesser variant (6.1's sockops cannot read the current task)."""

from __future__ import annotations

import shutil

import pytest

from sockwatch.kernel import bpfload
from tests.vm import kernels


def test_a_6_1_guest_runs_doctor_and_a_kernel_test(tmp_path) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("busybox") is None:
        pytest.fail("qemu-system-x86 and busybox-static are missing: scripts/test.sh installs them")
    k = kernels.fetch(kernels.newest("6.1"))
    command = kernels.test_command(["tests/kernel/test_table.py::test_tcp_listener_and_both_ends"], guest=True)
    run = kernels.boot(k, command, 600, tmp_path / "console.log")
    tail = run.output[-3000:]
    assert run.booted, tail
    got = kernels.summary(run)
    assert run.status == 0 and got["passed"] == 2 and got["failed"] == 0, tail
    assert "6.1." in run.kernel and "sockops cannot read the current task on this kernel" in run.output, tail
    # 6.1's kfree_skb names no socket: the drop hook is refused and doctor says why
    assert "does not name the socket (rx_sk: Linux 6.11 and later)" in run.output, tail
    assert got["hooks_loaded"] == len(bpfload.HOOKS) + 1, got  # + sk_lookup
    assert all(r.startswith(bpfload.DROP_HOOK.what) for r in got["hooks_refused"]), got  # 6.1: only the drop hook
