"""A short run of bench/bench_lookup.py (the full one is `scripts/bench.sh lookup`): the
benchmark works end to end, sockwatch's program counted the floods it measured, the
reading server kept up, and nothing it made is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.kernel.test_lookup import _ours


@pytest.mark.slow
def test_short_lookup_benchmark(tmp_path):
    links, netns = len(_ours(None)), _netns()
    out = tmp_path / "lookup.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_lookup.py"), "--triples", "6", "--seconds",
                        "0.5", "--json-out", str(out)], check=False, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["workloads"]) == {"udp_sendto", "udp_read", "tcp_crr"}
    for w in res["workloads"].values():
        assert {"sockwatch", "floor", "over_floor", "verdict", "rates"} <= set(w)
        assert w["sockwatch"]["pairs"] == 6 and all(x > 0 for xs in w["rates"].values() for x in xs), w
    # each datagram and SYN of sockwatch's slices is a lookup it counted (a slice lasts at
    # least its 0.5 s, and its rate is per second of the slice)
    ops = sum(x * 0.5 for w in res["workloads"].values() for x in w["rates"]["hooked"])
    assert res["lookups_counted_by_sockwatch"] >= ops, (res["lookups_counted_by_sockwatch"], ops)
    # the bench's own links went with it; an agent's link to its namespace goes when the
    # agent sees the namespace gone (within seconds)
    deadline = time.monotonic() + 10
    while len(_ours(None)) != links:
        assert time.monotonic() < deadline, (len(_ours(None)), links)
        time.sleep(0.2)
    assert _netns() == netns


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
