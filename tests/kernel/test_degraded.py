"""A kernel that refuses one of sockwatch's hooks: the agent runs without it, says so in
every answer, and reads what that hook would have fed from the kernel at each query, so
the table still equals ss.

The refusal is real: the kernel allows 64 programs per cgroup and attach type
(BPF_CGROUP_MAX_PROGS), so the test fills that hook's slots on the cgroup root with
programs that only return 1, and the agent's own attach then fails (E2BIG), as it would
on a kernel without that attach type (EINVAL). The fillers are links held by this
process: closing them, or its death, removes them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sockwatch.kernel import bpfload, prereq, syscalls
from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import AgentProc, Child, compare_with_ss, expected_links

BPF_PROG_LOAD = 5
PROG_TYPE = {"CGROUP_SOCK": 9, "SOCK_OPS": 13, "CGROUP_SOCK_ADDR": 18}
RETURN_1 = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 1; exit
E2BIG = 7


def _load_return_1(hook: bpfload.Hook) -> int:
    insns = ctypes.create_string_buffer(RETURN_1, len(RETURN_1))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(128)
    struct.pack_into("<IIQQ", attr, 0, PROG_TYPE[hook.prog_type], 2, ctypes.addressof(insns),
                     ctypes.addressof(license_))  # fmt: skip
    struct.pack_into("<I", attr, 68, hook.attach_type)  # expected_attach_type
    return syscalls.bpf(BPF_PROG_LOAD, ctypes.create_string_buffer(bytes(attr), len(attr)))


@contextmanager
def hook_slots_full(func: str) -> Iterator[int]:
    """Fill the cgroup root's program slots for `func`'s attach type; yields how many
    this test took."""
    hook = next(h for h in bpfload.HOOKS if h.func == func)
    cg = prereq.cgroup2_path()
    assert cg is not None
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    prog_fd = _load_return_1(hook)
    links: list[int] = []
    try:
        while True:
            try:
                links.append(syscalls.link_create(prog_fd, cg_fd, hook.attach_type))
            except OSError as e:
                assert e.errno == E2BIG, e
                break
            assert len(links) <= 64, "the kernel took more than BPF_CGROUP_MAX_PROGS programs"
        yield len(links)
    finally:
        for fd in links:
            os.close(fd)
        os.close(prog_fd)
        os.close(cg_fd)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(sockwatch_cmd(*args), capture_output=True, text=True, check=False, timeout=120)


def _churn(c: Child, n: int) -> None:
    """What every hook reports, made while the agent runs: UDP binds (some closed again),
    connected UDP, a TCP listener and connections accepted and closed."""
    bound = [c.do(op="udp_bind", addr="127.0.0.1", port=0) for _ in range(n)]
    for b in bound[: n // 2]:
        c.do(op="close", id=b["id"])
    for _ in range(n // 2):
        c.do(op="udp_connect", addr="127.0.0.9", port=9)
    server = c.do(op="tcp_listen", addr="127.0.0.1", port=0)
    for i in range(n // 2):
        conn = c.do(op="tcp_connect", addr="127.0.0.1", port=server["local"][1], accept_on=server["id"])
        if i % 2:
            c.do(op="close", id=conn["id"])
            c.do(op="close", id=conn["accepted"]["id"])


@pytest.mark.parametrize(
    ("func", "protocols"),
    [("sw_post_bind6", ("UDP",)), ("sw_sockops", ("TCP",)), ("sw_post_bind4", ("UDP",))],
    ids=["post_bind6", "sockops", "post_bind4"],
)
def test_a_refused_hook_degrades_and_the_table_still_equals_ss(func, protocols, netns, child_factory, tmp_path):
    path = str(tmp_path / "a.sock")
    with hook_slots_full(func) as taken:
        assert taken > 0
        a = AgentProc(socket=path)
        try:
            st = a.status()
            what = next(h.what for h in bpfload.HOOKS if h.func == func)
            missing = {m["hook"] for m in st["hooks_missing"]}
            assert what in missing, st["hooks_missing"]
            assert st["links"] == expected_links(st, len(missing))
            note = next(p for p in st["partial"] if p.startswith("degraded:"))
            assert " and ".join(protocols) + " rows are read from the kernel at each query" in note
            # what the missing hook would have reported, made after the agent started
            _churn(child_factory(netns.name), 20)
            compare_with_ss(netns, path)
            r = run_cli("snapshot", "--socket", path, "--netns", str(netns.inode))
            assert r.returncode == 0 and "degraded:" in r.stdout + r.stderr, r
            r = run_cli("status", "--socket", path)
            assert r.returncode == 0 and f"hook missing: {what}" in r.stdout, r
            assert a.status()["tracker"]["kernel_reads"] >= 2
        finally:
            a.stop()
    # the fillers are gone with their links: a fresh agent takes every hook
    a = AgentProc(socket=path)
    try:
        st = a.status()
        assert st["hooks_missing"] == [] and not [p for p in st["partial"] if p.startswith("degraded:")]
        assert st["links"] == expected_links(st)
    finally:
        a.stop()


def test_doctor_names_a_refused_hook_and_what_runs_without_it():
    with hook_slots_full("sw_connect4"):
        r = run_cli("doctor")
    assert r.returncode == 3, r
    line = next(x for x in r.stdout.splitlines() if "cgroup connect4 (UDP connects)" in x)
    assert line.lstrip().startswith("!!") and "Argument list too long" in line, line
    assert "sockwatch runs without it: UDP connects are not streamed" in line
    assert "Traceback" not in r.stdout + r.stderr
    other = next(x for x in r.stdout.splitlines() if "cgroup connect6 (UDP connects)" in x)
    assert other.lstrip().startswith("ok"), other


def test_every_hook_refused_is_one_sentence(tmp_path):
    """Short of no bpf() at all (its own prerequisite), every hook refused: the cgroup
    slots full, and by seccomp perf_event_open (the tracepoint's link needs a perf
    event), BPF_RAW_TRACEPOINT_OPEN and BPF_LINK_CREATE (the namespaces' sk_lookup
    links). One sentence, exit 3, nothing left."""
    nobpf = tmp_path / "nobpf"
    subprocess.run(["gcc", "-O2", "-o", str(nobpf), os.path.join(os.path.dirname(__file__), "nobpf.c")], check=True)
    full = [h.func for h in bpfload.HOOKS if not h.tracepoint]
    with contextlib.ExitStack() as stack:
        for func in full:
            stack.enter_context(hook_slots_full(func))
        r = subprocess.run(
            [str(nobpf), "--nr", str(syscalls.nr("perf_event_open")), "--bpf-cmd", "17",
             "--bpf-cmd", "28",
             *sockwatch_cmd("serve", "--socket", str(tmp_path / "s" / "a.sock"))],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
    assert r.returncode == 3 and "the kernel refused every sockwatch hook" in r.stderr, r
    assert "Traceback" not in r.stderr and "snapshot --standalone" in r.stderr
    assert not (tmp_path / "s").exists(), "a refused start left files"
