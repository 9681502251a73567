"""What each of sockwatch's BPF programs costs the host, from the kernel's own counters
(struct bpf_prog_info's run_cnt and run_time_ns).

The kernel counts only while BPF stats are enabled (kernel.bpf_stats_enabled, or a
BPF_ENABLE_STATS descriptor someone holds), and counting costs every BPF program on the
host ~20 ns a run, so sockwatch enables them only for a window somebody asked for
(`status --bpf-stats`) and closes the descriptor when it ends.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from sockwatch.kernel.links import Links
from sockwatch.kernel.syscalls import libbpf

BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type
PROG_INFO_SIZE = 256  # enough of struct bpf_prog_info for what is read here
RUN_TIME_NS_OFFSET = 192  # offsetof(struct bpf_prog_info, run_time_ns) (tests/unit/test_bpfstats.py checks)
RUN_CNT_OFFSET = 200  # offsetof(struct bpf_prog_info, run_cnt)
LINK_PROG_ID_OFFSET = 8  # offsetof(struct bpf_link_info, prog_id)


@dataclass(frozen=True)
class Runs:
    runs: int
    run_ns: int


def prog_runs(prog_id: int) -> Runs | None:
    """A program's counters so far, or None if it is gone."""
    lib = libbpf()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = (ctypes.c_uint8 * PROG_INFO_SIZE)()
        size = ctypes.c_uint32(PROG_INFO_SIZE)
        if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
            return None
        raw = bytes(info)
        return Runs(int.from_bytes(raw[RUN_CNT_OFFSET : RUN_CNT_OFFSET + 8], "little"),
                    int.from_bytes(raw[RUN_TIME_NS_OFFSET : RUN_TIME_NS_OFFSET + 8], "little"))  # fmt: skip
    finally:
        os.close(fd)


def link_prog_id(link_fd: int) -> int | None:
    info = (ctypes.c_uint8 * 64)()
    size = ctypes.c_uint32(64)
    if libbpf().bpf_obj_get_info_by_fd(link_fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        return None
    return int.from_bytes(bytes(info[LINK_PROG_ID_OFFSET : LINK_PROG_ID_OFFSET + 4]), "little")


def by_hook(links: Links) -> dict[str, Runs]:
    """Counters summed per hook (the sk_lookup program has one copy per namespace)."""
    out: dict[str, Runs] = {}
    seen: set[int] = set()
    for link in links:
        pid = link_prog_id(link.fd)
        if pid is None or pid in seen:
            continue
        seen.add(pid)
        r = prog_runs(pid)
        if r is None:
            continue
        was = out.get(link.what, Runs(0, 0))
        out[link.what] = Runs(was.runs + r.runs, was.run_ns + r.run_ns)
    return out


def kernel_counting() -> bool:
    """kernel.bpf_stats_enabled is on (someone else counts; our window adds nothing)."""
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class StatsWindow:
    """BPF stats enabled until `until` (monotonic seconds), then closed."""

    def __init__(self) -> None:
        self.fd = -1
        self.until = 0.0

    def open(self, until: float) -> None:
        """Enable (or extend). OSError if the kernel refuses (before 5.8, or no CAP_SYS_ADMIN)."""
        if self.fd < 0:
            fd = libbpf().bpf_enable_stats(BPF_STATS_RUN_TIME)
            if fd < 0:
                err = ctypes.get_errno() or -fd
                raise OSError(err, os.strerror(err))
            self.fd = fd
        self.until = max(self.until, until)

    @property
    def active(self) -> bool:
        return self.fd >= 0

    def close_if_over(self, now: float) -> None:
        if self.fd >= 0 and now >= self.until:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
