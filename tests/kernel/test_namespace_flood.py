"""An unprivileged user's namespaces cost the root agent a bounded number of kernel
objects: at most --max-lookup-namespaces sk_lookup programs, the rest counted and said
(status, the metrics, the partial note), and the slots come back when they go."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import AgentProc

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def lookup(agent: AgentProc) -> dict:
    return agent.status()["lookup"]


def until(agent: AgentProc, done, seconds: float = 15) -> dict:
    deadline = time.monotonic() + seconds
    while not done(got := lookup(agent)):
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    return got


def test_namespaces_made_by_nobody_are_hooked_up_to_the_cap(fresh_agent):
    a: AgentProc = fresh_agent(None, ("--max-lookup-namespaces", "6"))
    base = lookup(a)
    assert base["namespaces_cap"] == 6 and base["namespaces_over_cap"] == 0
    # 30 user+network namespaces, each held by a sleep of nobody's
    flood = [subprocess.Popen([*NOBODY, "unshare", "--user", "--map-root-user", "--net", "sleep", "600"])
             for _ in range(30)]  # fmt: skip
    try:
        got = until(a, lambda g: g["namespaces_known"] >= base["namespaces_known"] + 30
                    and g["namespaces_hooked"] == 6)  # fmt: skip
        assert got["namespaces_over_cap"] == got["namespaces_known"] - 6 - got["namespaces_refused"]
        st = a.status()
        assert any("--max-lookup-namespaces 6 was reached" in why for why in st["partial"]), st["partial"]
        with urllib.request.urlopen(st["metrics"], timeout=10) as r:
            text = r.read().decode()
        m = re.search(r"^sockwatch_lookup_namespaces_over_cap (\S+)$", text, re.M)
        assert m and float(m.group(1)) == got["namespaces_over_cap"], m
        assert re.search(r"^sockwatch_lookup_namespaces_hooked 6\.0$", text, re.M)
        doc = subprocess.run(sockwatch_cmd("doctor", "--socket", a.socket), capture_output=True, text=True, check=False)
        over = f"hooked in 6 namespaces (--max-lookup-namespaces 6; {got['namespaces_over_cap']} over it, not hooked)"
        assert over in doc.stdout and "--max-lookup-namespaces 6 was reached" in doc.stdout, doc.stdout
    finally:
        for p in flood:
            p.kill()
        for p in flood:
            p.wait(10)
    # gone: their programs with them, and nothing over the cap
    until(a, lambda g: g["namespaces_over_cap"] == 0 and g["namespaces_hooked"] <= base["namespaces_hooked"])
