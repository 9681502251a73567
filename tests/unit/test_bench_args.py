"""Every benchmark checks its arguments the same way (bench/common.parse_as_root): one
line naming what is allowed, exit 2, before anything is made."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(("bench", "args", "said"), [
    ("bench_cost.py", ["--pairs", "3"], "bench: --pairs 6..1000\n"),
    ("bench_cost.py", ["--workloads", "tcp_crr,nope"],
     "bench: --workloads from tcp_crr,udp_sendto,udp_send,udp_churn\n"),
    ("bench_traffic.py", ["--configs", ""], "bench: --configs from floor,sockwatch\n"),
    ("bench_lookup.py", ["--triples", "2", "--seconds", "0"], "bench: --triples 6..1000; --seconds 0.2..60\n"),
    ("bench_snapshot.py", ["--sockets", "10"], "bench: --sockets 1000..200000\n"),
    ("bench_churn.py", ["--udp-rate", "-1"], "bench: --udp-rate 0..1e+06\n"),
])  # fmt: skip
def test_a_bad_argument_is_one_line_and_exit_2(bench, args, said):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", bench), *args], capture_output=True, text=True,
                       check=False, timeout=60)  # fmt: skip
    assert (r.returncode, r.stderr, r.stdout) == (2, said, "")
