"""A short run of bench/bench_cost.py (the full one is `scripts/bench.sh cost`): the
benchmark works end to end and the agent's cost stays far from where it was before the
always-on cost work (TCP cycles -45%, 24% of a core at 10,000 connections/s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_short_cost_benchmark(tmp_path):
    out = tmp_path / "cost.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_cost.py"), "--repeat", "3", "--seconds", "1",
         "--paced-seconds", "5", "--churn-seconds", "5", "--workloads", "tcp_crr,udp_sendto", "--json-out", str(out)],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    # best run against best run: this VM's noise only ever slows a run down, and three
    # one-second rounds are too few for medians (the full benchmark reports those)
    for workload, floor in (("tcp_crr", 0.8), ("udp_sendto", 0.9)):
        w = res["workloads"][workload]
        assert w["with"]["max"] / w["without"]["max"] > floor, (workload, w)
    assert res["agent"]["cpu_percent_paced"] < 15, res["agent"]
    assert res["agent"]["rss_growth_percent"] < 10, res["agent"]
    # the ring never refuses a record while the agent keeps up (a torn write of the
    # consumer position once made the kernel see a full ring about every 16 MiB)
    assert res["agent"]["events_lost"] == 0 and res["agent"]["events_lost_full_speed"] == 0, res["agent"]
