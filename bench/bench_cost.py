"""What `sockwatch serve` costs the host, paired (bench/paired.py's method): C load
generators in short slices alternately in a cgroup the agent hooks and in one it does
not, while one agent runs throughout; each pair of adjacent slices gives one ratio.

  tcp_crr     TCP connect/accept/close cycles/s, one process, SO_LINGER 0   (loss <= 5%)
  udp_sendto  unconnected sendto() of 64-byte datagrams                      (loss <= 3%)
  udp_send    connected send() of 64-byte datagrams                          (loss <= 2%)
  udp_churn   socket(), sendto() (autobind), close()                         (reported)

(nginx, the C loops closing by FIN and the kernel's floor beside them are
bench_traffic.py's; the per-namespace sk_lookup hook is the same on both sides here and
is bench_lookup.py's and bench_dns.py's.) The workloads run in a network namespace of
the benchmark's own, pinned to CPU 0. Then, with an agent hooked host-wide: its CPU
while tcp_crr is paced at 10,000 cycles/s, and its memory before and after
--churn-seconds of that churn.

Everything it creates (namespace, cgroups, processes, agents, the compiled load
generator) is removed by id at the end. Results: bench/results/cost.json.

  sudo .venv/bin/python bench/bench_cost.py --pairs 21 --seconds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from common import parse_as_root
from paired import Cgroups, HookedAgent, in_cgroup, run_pairs, summary

HERE = os.path.dirname(os.path.abspath(__file__))
SW = [sys.executable, "-m", "sockwatch"]
WORKLOADS = {"tcp_crr": 0.05, "udp_sendto": 0.03, "udp_send": 0.02, "udp_churn": None}  # allowed loss


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Bench:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ns = f"sw-cost-{uuid.uuid4().hex[:8]}"
        self.tmp = tempfile.mkdtemp(prefix="sw-cost-")
        self.loadgen = os.path.join(self.tmp, "loadgen")
        self.sock = f"/run/sockwatch-bench/{self.ns}/agent.sock"
        self.agent: subprocess.Popen | None = None
        self.pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []

    def setup(self) -> None:
        subprocess.run(["gcc", "-O2", "-o", self.loadgen, os.path.join(HERE, "loadgen.c")], check=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)

    def run(self, mode: str, seconds: float | None = None, rate: float = 0, cgroup: str | None = None) -> float:
        cmd = ["ip", "netns", "exec", self.ns, *self.pin, self.loadgen, mode, "127.0.0.1", "9000"]
        cmd += [str(seconds or self.seconds), str(rate)]
        r = subprocess.run(in_cgroup(cgroup, cmd) if cgroup else cmd, check=True, capture_output=True, text=True)
        return float(json.loads(r.stdout)["rate"])

    def start_agent(self) -> int:
        self.agent = subprocess.Popen([*SW, "serve", "--socket", self.sock], stderr=subprocess.PIPE)
        while subprocess.run([*SW, "status", "--socket", self.sock], check=False, capture_output=True).returncode:
            if self.agent.poll() is not None:
                err = self.agent.stderr.read().decode() if self.agent.stderr else ""
                raise SystemExit(f"bench: the agent failed to start: {err}")
            time.sleep(0.1)
        return self.agent.pid

    def status(self) -> dict:
        r = subprocess.run([*SW, "status", "--json", "--socket", self.sock], check=True, capture_output=True)
        return json.loads(r.stdout)

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.agent = None
        for path in (self.sock, self.sock + ".lock"):  # what a killed agent could not remove
            if os.path.exists(path):
                os.unlink(path)
        for d in (os.path.dirname(self.sock), os.path.dirname(os.path.dirname(self.sock))):
            try:
                os.rmdir(d)
            except OSError:
                pass

    def cleanup(self) -> None:
        self.stop_agent()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=21, help="pairs of slices per workload (>= 15 for figures)")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one slice")
    ap.add_argument("--paced-rate", type=float, default=10_000, help="tcp_crr cycles/s for the agent-CPU figure")
    ap.add_argument("--paced-seconds", type=float, default=20.0)
    ap.add_argument("--churn-seconds", type=float, default=60.0, help="churn before the memory figure (600 = 10 min)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "cost.json"))
    args = parse_as_root(ap, {"pairs": (6, 1000), "seconds": (0.2, 60)}, {"workloads": tuple(WORKLOADS)})
    workloads = [w for w in args.workloads.split(",") if w]

    b = Bench(args.seconds)
    cg: Cgroups | None = None
    result: dict = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "seconds_per_slice": args.seconds,
        "workloads": {},
    }
    try:
        b.setup()
        cg = Cgroups.make()
        hooked = HookedAgent(cg)
        try:
            sides = cg
            for w in workloads:  # (the sides' slices run in turn: one port serves both)
                ratios = run_pairs(lambda side, w=w: b.run(w, cgroup=sides.side(side)), args.pairs, w)
                result["workloads"][w] = {**summary(ratios), "target": WORKLOADS[w]}
            lost_in_pairs = hooked.status()["bpf"]["ringbuf_full"]
        finally:
            hooked.stop()

        pid = b.start_agent()
        time.sleep(1)
        rss0 = proc_rss_mib(pid)
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        paced = b.run("tcp_crr", args.paced_seconds, args.paced_rate)
        cpu_paced = (proc_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        st_paced = b.status()
        left = args.churn_seconds - args.paced_seconds
        while left > 0:
            b.run("tcp_crr", min(left, 60), args.paced_rate)
            left -= 60
        time.sleep(3)
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        time.sleep(10)
        cpu_idle = (proc_cpu_seconds(pid) - cpu1) / (time.monotonic() - t1)
        rss1 = proc_rss_mib(pid)
        st = b.status()
        b.stop_agent()
        result["agent"] = {
            "paced_rate": round(paced),
            "cpu_percent_paced": round(100 * cpu_paced, 2),
            "cpu_percent_idle_after": round(100 * cpu_idle, 2),
            "rss_mib_start": round(rss0, 1),
            "rss_mib_after_churn": round(rss1, 1),
            "churn_seconds": args.churn_seconds,
            "rss_growth_percent": round(100 * (rss1 - rss0) / rss0, 1),
            "events_lost": st["bpf"]["ringbuf_full"],
            "events_lost_full_speed": lost_in_pairs,
            "status_after_paced": st_paced["last_minute"],
            "coalesced": st["tracker"]["coalesced"],
            "events": st["bpf"]["events"],
        }
        print(f"\n{'workload':<12} {'cost (median)':>14} {'IQR':>18} {'95% CI':>18}  target")
        ok = True
        for w, r in result["workloads"].items():
            allowed, cost = r["target"], r["cost_median"]
            verdict = "" if allowed is None else (f"<= {allowed:.0%} " + ("met" if cost <= allowed else "MISSED"))
            ok = ok and (allowed is None or cost <= allowed)
            (lo, hi), (c0, c1) = r["cost_iqr"], r["cost_ci95"]
            print(f"{w:<12} {cost:>14.1%} {lo:>+8.1%}..{hi:<+8.1%} {c0:>+8.1%}..{c1:<+8.1%}  {verdict}")
        ag = result["agent"]
        print(
            f"\nagent CPU at {ag['paced_rate']} tcp cycles/s: {ag['cpu_percent_paced']}% of one core (target <= 10%); "
            f"idle after: {ag['cpu_percent_idle_after']}%"
        )
        print(
            f"agent memory: {ag['rss_mib_start']} MiB at start, {ag['rss_mib_after_churn']} MiB after "
            f"{args.churn_seconds:.0f}s of churn ({ag['rss_growth_percent']:+}%; target within 10%); "
            f"events lost: {ag['events_lost']} (paced), {ag['events_lost_full_speed']} (full-speed slices)"
        )
        result["targets_met"] = ok
        os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results: {args.json_out}")
    finally:
        b.cleanup()
        if cg is not None:
            cg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
