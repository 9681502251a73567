"""What sockwatch costs real TCP traffic, paired (bench/paired.py): nginx serving a new
connection per request (closed by FIN: TIME-WAIT piles up to the kernel's limit) and
keep-alive, and the C connect/accept/close loop closing by FIN and by RST, each
measured with the agent's hooks and with the kernel's floor (a bare sockops program
that only asks for state callbacks) in the same run: the workload runs in short slices in
three cgroups in turn (the agent's, the floor's, one with nothing), the order rotating,
so that each triple of adjacent slices gives sockwatch's cost, the floor's, and
sockwatch's over the floor's, all paired. Then the agent's own CPU with nginx at full
speed on new connections, and idle.

  sudo .venv/bin/python bench/bench_traffic.py --pairs 61

Everything runs in a network namespace of its own; nginx (one worker) on CPU 0, the load
on CPU 1. Needs Debian's nginx-light and wrk (scripts/bench.sh installs them). Results:
bench/results/traffic.json.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from common import host, parse_as_root, stop, write_result
from paired import (
    TRIPLE,
    BareSockops,
    Cgroups,
    HookedAgent,
    in_cgroup,
    proc_cpu_seconds,
    run_pairs,
    run_triples,
    summary,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PORTS = {"hooked": 8081, "plain": 8082, "floor": 8083}
WORKLOADS = ("nginx_close", "nginx_keepalive", "crr_fin", "crr_rst")
TARGETS = {"nginx_close": 0.05, "nginx_keepalive": 0.01}  # the C loops: <= 1.5x the floor

NGINX_CONF = """worker_processes 1;
daemon off;
pid {tmp}/nginx-{side}.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class Traffic:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ns = f"sw-traffic-{uuid.uuid4().hex[:8]}"
        self.tmp = tempfile.mkdtemp(prefix="sw-traffic-")
        self.loadgen = os.path.join(self.tmp, "loadgen")
        self.cg = Cgroups.make()
        self.nginx: dict[str, subprocess.Popen] = {}

    def netns(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def setup(self) -> None:
        for tool in ("nginx", "wrk"):
            if shutil.which(tool) is None:
                raise SystemExit(f"bench: {tool} is missing (scripts/bench.sh traffic installs it)")
        subprocess.run(["gcc", "-O2", "-o", self.loadgen, os.path.join(HERE, "loadgen.c")], check=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)

    def start_nginx(self) -> None:
        """One nginx per side, started in that side's cgroup (its sockets, and the
        connections they accept, belong to it)."""
        for side, port in PORTS.items():
            conf = os.path.join(self.tmp, f"nginx-{side}.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=self.tmp, side=side, port=port))
            cmd = ["taskset", "-c", "0", "nginx", "-e", os.path.join(self.tmp, f"error-{side}.log"), "-c", conf]
            self.nginx[side] = subprocess.Popen(in_cgroup(self.cg.side(side), self.netns(cmd)))
        for side, port in PORTS.items():
            for _ in range(100):
                if subprocess.run(self.netns(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]),
                                  check=False, capture_output=True).returncode == 0:  # fmt: skip
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"bench: nginx ({side}) did not start")

    def wrk(self, side: str, close: bool, seconds: float) -> float:
        # wrk takes whole seconds
        cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{max(1, round(seconds))}s"]
        if close:
            cmd += ["-H", "Connection: close"]
        cmd.append(f"http://127.0.0.1:{PORTS[side]}/")
        r = subprocess.run(in_cgroup(self.cg.side(side), self.netns(cmd)), capture_output=True, text=True, check=True)
        m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
        if m is None:
            raise SystemExit(f"bench: wrk said {r.stdout!r}")
        return float(m.group(1))

    def crr(self, side: str, mode: str) -> float:
        import json

        cmd = ["taskset", "-c", "0", self.loadgen, mode, "127.0.0.1", str(9100 + TRIPLE.index(side)), f"{self.seconds}"]
        r = subprocess.run(in_cgroup(self.cg.side(side), self.netns(cmd)), capture_output=True, text=True, check=True)
        return float(json.loads(r.stdout)["rate"])

    def measure(self, workload: str) -> Callable[[str], float]:
        if workload == "nginx_close":
            return lambda side: self.wrk(side, True, self.seconds)
        if workload == "nginx_keepalive":
            return lambda side: self.wrk(side, False, self.seconds)
        mode = "tcp_crr_fin" if workload == "crr_fin" else "tcp_crr"
        return lambda side: self.crr(side, mode)

    def timewait(self) -> int:
        r = subprocess.run(self.netns(["ss", "-Htan", "state", "time-wait"]), check=False, capture_output=True,
                           text=True)  # fmt: skip
        return len(r.stdout.splitlines())

    def cleanup(self) -> None:
        for p in self.nginx.values():
            stop(p)
        self.cg.remove()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def together(t: Traffic, workloads: list[str], triples: int, result: dict) -> None:
    """The agent on hooked/, a bare sockops program on floor/, nothing on plain/: each
    workload in triples of adjacent slices, so sockwatch's cost over the floor's is
    paired too."""
    floor, agent = BareSockops(t.cg, "floor"), HookedAgent(t.cg)
    try:
        out = result["configs"]
        out["floor"], out["sockwatch"], out["over_floor"] = {}, {}, {}
        verdicts = result["verdicts"] = {}
        for w in workloads:
            got = run_triples(t.measure(w), triples, w)
            for key, ratios in got.items():
                out[key][w] = summary(ratios)
            cost, fl = out["sockwatch"][w]["cost_median"], out["floor"][w]["cost_median"]
            print(f"{w:<16} sockwatch {cost:+.1%} floor {fl:+.1%} over the floor "
                  f"{out['over_floor'][w]['cost_median']:+.1%}", file=sys.stderr)  # fmt: skip
            if w in TARGETS:
                verdicts[w] = {"target": f"<= {TARGETS[w]:.0%}", "met": cost <= TARGETS[w]}
            else:
                verdicts[w] = {"target": "<= 1.5x the floor", "met": cost <= 1.5 * max(fl, 0.0)}
    finally:
        agent.stop()
        floor.stop()


def alone(t: Traffic, config: str, workloads: list[str], pairs: int, result: dict) -> None:
    """One configuration on hooked/ against plain/, in pairs."""
    hooks = BareSockops(t.cg, "hooked") if config == "floor" else HookedAgent(t.cg)
    try:
        out = result["configs"][config] = {}
        for w in workloads:
            out[w] = summary(run_pairs(t.measure(w), pairs, f"{config} {w}"))
            lo, hi = out[w]["cost_iqr"]
            print(f"{config:<10} {w:<16} cost {out[w]['cost_median']:+.1%} (IQR {lo:+.1%}..{hi:+.1%})",
                  file=sys.stderr)  # fmt: skip
    finally:
        hooks.stop()


def measure_agent(t: Traffic, seconds: float, result: dict) -> None:
    """The agent's own CPU with nginx at full speed on new connections, then idle."""
    hooks = HookedAgent(t.cg)
    try:
        cpu0, t0 = proc_cpu_seconds(hooks.pid), time.monotonic()
        rate = t.wrk("hooked", True, seconds)
        busy = (proc_cpu_seconds(hooks.pid) - cpu0) / (time.monotonic() - t0)
        tw = t.timewait()
        st = hooks.status()
        time.sleep(2)
        cpu1, t1 = proc_cpu_seconds(hooks.pid), time.monotonic()
        time.sleep(10)
        idle = (proc_cpu_seconds(hooks.pid) - cpu1) / (time.monotonic() - t1)
        result["agent"] = {
            "nginx_close_requests_per_second": round(rate),
            "cpu_percent_at_full_speed": round(100 * busy, 2),
            "cpu_percent_idle_after": round(100 * idle, 2),
            "timewait_after": tw,
            "records_to_the_agent": st["tracker"]["events"],
            "tcp_opened_in_kernel": st["bpf"].get("tcp_opened"),
        }
        print(f"agent: {result['agent']}", file=sys.stderr)
    finally:
        hooks.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pairs", type=int, default=31, help="pairs of slices per workload (triples, with both configurations)"
    )
    ap.add_argument("--seconds", type=float, default=0.5, help="one slice")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument(
        "--configs",
        default="floor,sockwatch",
        help="floor (a bare sockops program), sockwatch; both: measured in the same slices",
    )
    ap.add_argument(
        "--agent-seconds", type=float, default=10.0, help="nginx at full speed for the agent's CPU (0: skip)"
    )
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "traffic.json"))
    args = parse_as_root(ap, {"pairs": (6, 1000), "seconds": (0.2, 30)},
                         {"workloads": WORKLOADS, "configs": ("floor", "sockwatch")})  # fmt: skip
    workloads = [w for w in args.workloads.split(",") if w]
    configs = sorted({c for c in args.configs.split(",") if c})
    t = Traffic(args.seconds)
    result: dict = {"host": host("bench/bench_traffic.py"), "seconds_per_slice": args.seconds, "configs": {}}
    with open("/sys/devices/system/cpu/vulnerabilities/spectre_v2") as f:
        result["host"]["spectre_v2"] = f.read().strip()
    try:
        t.setup()
        t.start_nginx()
        if len(configs) == 2:
            together(t, workloads, args.pairs, result)
        else:
            alone(t, configs[0], workloads, args.pairs, result)
        if "sockwatch" in configs and args.agent_seconds > 0:
            measure_agent(t, args.agent_seconds, result)
    finally:
        t.cleanup()
    write_result(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
