"""sockwatch against the tools SREs already run for TCP connections, bcc's tcplife and
tcpstates (Debian's bpfcc-tools), on the same traffic: what each costs the host per
connection, counted rather than inferred from throughput.

For each tool in turn (rounds interleave the order), with the tool attached and the
kernel's BPF stats on: nginx serving a new connection per request (wrk, closed by FIN)
and the C connect/accept/close loop (FIN). The cost is the tool's own CPU (its process:
bcc's tools format a line per connection in Python, sockwatch's agent reads nothing per
connection) plus the run time of the BPF programs it loaded (the kernel's counters),
over the connections made. Throughput beside it is taken in the same slices (these VMs
drift, so it is reported, not ranked). bcc's tools need tracefs for their tracepoint:
each runs in a mount namespace of its own with tracefs mounted there, never on the host.

  sudo .venv/bin/python bench/bench_peers.py --rounds 3

Results: bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_traffic import Traffic  # noqa: E402
from common import host, parse_as_root, stop, write_result  # noqa: E402
from paired import proc_cpu_seconds  # noqa: E402

from sockwatch.kernel import bpfstats, syscalls  # noqa: E402

TOOLS = ("sockwatch", "tcplife", "tcpstates")


def prog_ids() -> set[int]:
    lib = syscalls.libbpf()
    out, cur, nxt = set(), ctypes.c_uint32(0), ctypes.c_uint32(0)
    while lib.bpf_prog_get_next_id(cur, ctypes.byref(nxt)) == 0:
        cur.value = nxt.value
        out.add(cur.value)
    return out


def bpf_ns(ids: set[int]) -> int:
    return sum(r.run_ns for i in ids if (r := bpfstats.prog_runs(i)) is not None)


class Tool:
    def __init__(self, name: str, tmp: str) -> None:
        self.name = name
        self.out = os.path.join(tmp, f"{name}.out")
        before = prog_ids()
        if name == "sockwatch":
            self.sock = os.path.join(tmp, "agent.sock")
            cmd = [sys.executable, "-m", "sockwatch", "serve", "--socket", self.sock, "--listen", "off"]
        else:
            tool = shutil.which(f"{name}-bpfcc")
            if tool is None:
                raise SystemExit(f"bench: {name}-bpfcc is missing (scripts/bench.sh peers installs bpfcc-tools)")
            # tracefs in a mount namespace of the tool's own; the host's mounts stay as they are
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tracefs tracefs /sys/kernel/tracing && exec "$0"', tool]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # a line per connection, as on a terminal
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=os.path.dirname(HERE), env=env)
        deadline = time.monotonic() + 120
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.out) as f:
                    raise SystemExit(f"bench: {name} did not start: {f.read()[-2000:]}")
            time.sleep(0.2)
        time.sleep(0.5)
        self.progs = prog_ids() - before

    def ready(self) -> bool:
        if self.name == "sockwatch":
            r = subprocess.run([sys.executable, "-m", "sockwatch", "status", "--socket", self.sock], check=False,
                               capture_output=True, cwd=os.path.dirname(HERE))  # fmt: skip
            return r.returncode == 0
        with open(self.out) as f:
            return bool(f.readline())  # the header: attached

    def cost(self) -> tuple[float, int]:
        """(CPU seconds of the tool's process, BPF run ns of its programs) so far."""
        return proc_cpu_seconds(self.proc.pid), bpf_ns(self.progs)

    def stop(self) -> None:
        stop(self.proc, 20, signal.SIGINT)  # as a person stops it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="each workload, per tool and round")
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "peers.json"))
    args = parse_as_root(ap, {"rounds": (1, 20), "seconds": (1, 60)})
    t = Traffic(args.seconds)
    tmp = tempfile.mkdtemp(prefix="sw-peers-")
    stats = bpfstats.StatsWindow()
    per: dict[str, dict[str, list[dict]]] = {tool: {"nginx_close": [], "crr_fin": []} for tool in TOOLS}
    try:
        t.setup()
        t.start_nginx()
        stats.open(time.monotonic() + 3600)
        for rnd in range(args.rounds):
            order = TOOLS if rnd % 2 == 0 else TOOLS[::-1]
            for name in order:
                tool = Tool(name, tmp)
                try:
                    for w in ("nginx_close", "crr_fin"):
                        cpu0, ns0 = tool.cost()
                        t0 = time.monotonic()
                        if w == "nginx_close":
                            rate = t.wrk("hooked", True, args.seconds)
                        else:
                            rate = t.crr("hooked", "tcp_crr_fin")
                        took = time.monotonic() - t0
                        cpu1, ns1 = tool.cost()
                        conns = rate * args.seconds
                        per[name][w].append({
                            "rate": round(rate),
                            "tool_cpu_us_per_conn": round(1e6 * (cpu1 - cpu0) / conns, 3),
                            "bpf_us_per_conn": round((ns1 - ns0) / 1e3 / conns, 3),
                            "seconds": round(took, 2),
                        })  # fmt: skip
                        r = per[name][w][-1]
                        print(f"round {rnd + 1} {name:<10} {w:<12} {rate:>8.0f}/s  "
                              f"tool {r['tool_cpu_us_per_conn']:.2f} + BPF {r['bpf_us_per_conn']:.2f} us a connection",
                              file=sys.stderr)  # fmt: skip
                finally:
                    tool.stop()
    finally:
        stats.close()
        t.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict = {"host": host("bench/bench_peers.py"), "seconds": args.seconds, "tools": {}}
    print(f"\n{'tool':<10} {'workload':<12} {'conn/s':>8} {'tool us':>8} {'BPF us':>7} {'total us/conn':>14}")
    for name in TOOLS:
        result["tools"][name] = {}
        for w, runs in per[name].items():
            m = {k: statistics.median(r[k] for r in runs) for k in ("rate", "tool_cpu_us_per_conn", "bpf_us_per_conn")}
            m["total_us_per_conn"] = round(m["tool_cpu_us_per_conn"] + m["bpf_us_per_conn"], 3)
            result["tools"][name][w] = {"median": m, "runs": runs}
            print(f"{name:<10} {w:<12} {m['rate']:>8.0f} {m['tool_cpu_us_per_conn']:>8.2f} "
                  f"{m['bpf_us_per_conn']:>7.2f} {m['total_us_per_conn']:>14.2f}")  # fmt: skip
    write_result(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
