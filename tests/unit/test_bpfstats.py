"""The offsets sockwatch reads the kernel's BPF stats at, against the UAPI header as
the C compiler lays it out."""

from __future__ import annotations

import os
import subprocess
import tempfile

from sockwatch.kernel import bpfstats


def test_offsets_match_linux_bpf_h():
    src = """#include <stdio.h>
#include <stddef.h>
#include <linux/bpf.h>
int main(void) {
    printf("%zu %zu %zu %zu\\n", offsetof(struct bpf_prog_info, run_time_ns), offsetof(struct bpf_prog_info, run_cnt),
           sizeof(struct bpf_prog_info), offsetof(struct bpf_link_info, prog_id));
    return 0;
}
"""
    with tempfile.TemporaryDirectory() as d:
        c, exe = os.path.join(d, "o.c"), os.path.join(d, "o")
        with open(c, "w") as f:
            f.write(src)
        subprocess.run(["gcc", "-o", exe, c], check=True)
        run_time, run_cnt, size, prog_id = map(int, subprocess.run([exe], capture_output=True, text=True,
                                                                   check=True).stdout.split())  # fmt: skip
    assert (run_time, run_cnt, prog_id) == (bpfstats.RUN_TIME_NS_OFFSET, bpfstats.RUN_CNT_OFFSET,
                                            bpfstats.LINK_PROG_ID_OFFSET)  # fmt: skip
    assert bpfstats.PROG_INFO_SIZE >= run_cnt + 8 and size >= run_cnt + 8


def test_a_window_closes_when_it_is_over():
    w = bpfstats.StatsWindow()
    w.fd, w.until = os.open("/dev/null", os.O_RDONLY), 10.0  # as if the kernel had given it
    w.close_if_over(9.9)
    assert w.active
    w.close_if_over(10.0)
    assert not w.active
