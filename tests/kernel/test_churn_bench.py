"""A short run of bench/bench_churn.py (the full one is `scripts/bench.sh churn`): under
TCP and UDP churn, with idle clients and a snapshot every second, the agent answers
every snapshot, loses nothing, leaves no stale owner-map entry, and its table equals ss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_short_churn_benchmark(tmp_path):
    out = tmp_path / "churn.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_churn.py"), "--seconds", "10", "--json-out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert r.returncode == 0 and res["held"], res
    assert res["lost_ring"] == 0 and res["snapshot_failures"] == 0 and res["table_equals_ss"], res
