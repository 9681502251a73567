"""What a Prometheus scrape of `sockwatch serve` costs at 100,000 sockets, against the
same scrape with an empty table, in one run: scrape latency (p50/p99/max), series
returned, and the agent's CPU while scraped once a second.

  sudo .venv/bin/python bench/bench_scrape.py                 # ~3 minutes
  sudo .venv/bin/python bench/bench_scrape.py --scrapes 20 --sockets 20000

Results: bench/results/scrape.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cost import Bench, proc_cpu_seconds
from common import HeldSockets, host, parse_as_root, write_result

HERE = os.path.dirname(os.path.abspath(__file__))


def scrape(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    took = time.perf_counter() - t0
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return took, series


def measure(url: str, agent_pid: int, n: int) -> dict:
    times, series = [], 0
    cpu0, t0 = proc_cpu_seconds(agent_pid), time.monotonic()
    for _ in range(n):
        took, series = scrape(url)
        times.append(took)
        time.sleep(max(0.0, 1.0 - took))  # once a second, as a 1 s scrape interval would
    span = time.monotonic() - t0
    times.sort()
    return {
        "p50_seconds": round(statistics.median(times), 4),
        "p99_seconds": round(times[min(len(times) - 1, int(0.99 * len(times)))], 4),
        "max_seconds": round(times[-1], 4),
        "series": series,
        "agent_cpu_percent_at_1_per_second": round(100 * (proc_cpu_seconds(agent_pid) - cpu0) / span, 2),
    }


def idle_cpu_percent(pid: int, seconds: float = 10.0) -> float:
    """The agent's CPU while nobody scrapes it."""
    cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (proc_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--scrapes", type=int, default=60)
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "scrape.json"))
    args = parse_as_root(ap, {"sockets": (1000, 200_000), "scrapes": (5, 600)})
    b = Bench(1.0)
    held_sockets: HeldSockets | None = None
    result: dict = {}
    try:
        b.setup()
        agent_pid = b.start_agent()
        url = b.status()["metrics"]
        idle = idle_cpu_percent(agent_pid)
        result["empty_table"] = measure(url, agent_pid, args.scrapes) | {"agent_cpu_percent_unscraped": round(idle, 2)}
        held_sockets = HeldSockets(b.ns, args.sockets, 9100)
        held = held_sockets.held
        t0 = time.monotonic()
        while b.status()["pending"] and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        idle = idle_cpu_percent(agent_pid)
        result["full_table"] = measure(url, agent_pid, args.scrapes) | {"agent_cpu_percent_unscraped": round(idle, 2)}
        result["full_table"]["scrape_cpu_percent"] = round(
            result["full_table"]["agent_cpu_percent_at_1_per_second"] - idle, 2
        )
        result["setup"] = {"sockets_held": held, "scrapes": args.scrapes,
                           **host("sudo .venv/bin/python bench/bench_scrape.py")}  # fmt: skip
    finally:
        if held_sockets is not None:
            held_sockets.close()
        b.cleanup()
    write_result(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
