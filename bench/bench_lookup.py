"""What the socket-lookup hook costs a flood, paired (bench/paired.py's method): the
same workload in short slices in turn with sockwatch's programs attached (sw_lookup
counting lookups and UDP peers, plus sw_lookup_miss and sw_drop on kfree_skb), with an empty
sk_lookup program (the kernel's own dispatch: the floor any sk_lookup program pays),
and with nothing, the order rotating, so that each triple of adjacent slices gives
sockwatch's cost, the floor's, and sockwatch's over the floor's. The programs go on and
off between slices (a link made or closed: microseconds, outside the timed slice).

  udp_sendto  a C sender's unconnected 64-byte datagrams to an unconnected socket that
              never reads: every datagram is dropped at its full queue, so the miss
              program on kfree_skb runs for each (the whole receive path, lookup
              included, runs on the sender's CPU)
  udp_read    the same flood, every datagram read by its server (none dropped)
  tcp_crr     connect/accept/close cycles (one lookup per SYN)

The programs are sockwatch's own, compiled and attached by the same code `serve` uses,
to a namespace of the benchmark's own only (no agent runs: the host's other namespaces
are untouched). --no-peers builds them as `serve --max-udp-peers 0` does. Everything it
creates (namespace, links, programs, the compiled load generator) is removed at the
end. Results: bench/results/lookup.json.

  sudo .venv/bin/python bench/bench_lookup.py --triples 21 --seconds 1
  sudo .venv/bin/python bench/bench_lookup.py --profile sockwatch --workload udp_read

--profile CONFIG runs one workload under `perf record` on the sender's CPU instead, with
CONFIG attached, and prints where that CPU's time went (the JIT'd programs by name:
net.core.bpf_jit_kallsyms must be 1, as it is for root by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable

from common import host, parse_as_root, write_result
from paired import run_triples, summary

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = ("none", "empty sk_lookup", "kfree_skb alone", "sockwatch without drops", "sockwatch")  # (--profile's)
SIDE_CONFIG = {"hooked": "sockwatch", "floor": "empty sk_lookup", "plain": "none"}
TARGETS = {"udp_sendto": 0.03, "udp_read": 0.03, "tcp_crr": 0.05}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triples", type=int, default=21, help="triples of slices per workload (>= 15 for figures)")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one slice")
    ap.add_argument("--no-peers", action="store_true", help="sockwatch's programs as --max-udp-peers 0 builds them")
    ap.add_argument("--json-out", help="default: bench/results/lookup.json (lookup_drop_hook.json with --drop-hook)")
    ap.add_argument("--profile", choices=CONFIGS, help="profile one config with perf instead of comparing")
    ap.add_argument("--workload", choices=list(TARGETS), default="udp_read", help="the workload --profile runs")
    ap.add_argument("--drop-hook", action="store_true",
                    help="what the drop hook adds: its floor is sockwatch's programs without it")  # fmt: skip
    args = parse_as_root(ap, {"triples": (6, 1000), "seconds": (0.2, 60)})
    if args.json_out is None:
        args.json_out = os.path.join(HERE, "results", "lookup_drop_hook.json" if args.drop_hook else "lookup.json")
    if args.profile and shutil.which("perf") is None:
        print("bench: --profile needs perf (Debian's linux-perf)", file=sys.stderr)
        return 2

    from bcc import BPF

    from sockwatch.kernel import bpfload, drops, lookup, syscalls
    from sockwatch.kernel.links import Links
    from sockwatch.kernel.netns import cookie_of_netns

    ns = f"sw-lookup-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.mkdtemp(prefix="sw-lookup-")
    loadgen = os.path.join(tmp, "loadgen")
    pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
    b = empty = None
    nsfd = -1
    out: dict = {"host": host("bench/bench_lookup.py"), "seconds_per_slice": args.seconds,
                 "peers": not args.no_peers, "workloads": {}}  # fmt: skip
    try:
        subprocess.run(["gcc", "-O2", "-o", loadgen, os.path.join(HERE, "loadgen.c")], check=True)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        ns_cookie = cookie_of_netns(nsfd)
        sizes = bpfload.Sizes(max_udp_peers=0) if args.no_peers else bpfload.Sizes()
        b = bpfload.compile_programs(sizes, bpfload.drop_reasons())
        hook = lookup.LookupHook(b, Links())
        bpfload.load_drop_sites(b)
        miss = next(h for h in bpfload.HOOKS if h.func == "sw_lookup_miss")
        drop_code = bytes(b.dump_func("sw_drop"))
        empty = BPF(text="int sw_empty(struct bpf_sk_lookup *ctx) { return SK_PASS; }")
        empty_fn = empty.load_func("sw_empty", lookup.BPF_PROG_TYPE_SK_LOOKUP, attach_type=lookup.BPF_SK_LOOKUP)

        def gen(workload: str, seconds: float) -> list[str]:
            """The load generator, pinned, in the bench's namespace: prints its rate as JSON."""
            return ["ip", "netns", "exec", ns, *pin, loadgen, workload, "127.0.0.1", "9000", str(seconds)]

        def run(workload: str) -> float:
            r = subprocess.run(gen(workload, args.seconds), check=True, capture_output=True, text=True)
            return float(json.loads(r.stdout)["rate"])

        def attach(config: str) -> list[int]:
            fds: list[int] = []
            if config == "empty sk_lookup":
                fds.append(syscalls.link_create(empty_fn.fd, nsfd, lookup.BPF_SK_LOOKUP))
            elif config == "kfree_skb alone":
                fds.append(bpfload.attach_one(b, miss, -1))
            elif config in ("sockwatch", "sockwatch without drops"):
                fds.append(hook.link(ns_cookie, nsfd))
                fds.append(bpfload.attach_one(b, miss, -1))
                if config == "sockwatch":
                    fds.append(drops.attach(drop_code))  # per-socket drops: runs for each dropped datagram
            return fds

        if args.profile:
            fds = attach(args.profile)
            try:
                return profile(gen(args.workload, args.seconds + 1), args.workload, args.seconds, tmp)
            finally:
                for fd in fds:
                    os.close(fd)

        rates: dict[str, dict[str, list[float]]] = {w: {side: [] for side in SIDE_CONFIG} for w in TARGETS}
        sides = SIDE_CONFIG | ({"floor": "sockwatch without drops"} if args.drop_hook else {})
        out["floor"] = sides["floor"]

        def measure(workload: str) -> Callable[[str], float]:
            def slice_(side: str) -> float:
                fds = attach(sides[side])
                try:
                    rate = run(workload)
                finally:
                    for fd in fds:
                        os.close(fd)
                rates[workload][side].append(rate)
                return rate

            return slice_

        for w, target in TARGETS.items():
            got = run_triples(measure(w), args.triples, w)
            out["workloads"][w] = {key: summary(ratios) for key, ratios in got.items()}
            out["workloads"][w]["rates"] = {side: [round(x) for x in xs] for side, xs in rates[w].items()}
            cost = out["workloads"][w]["sockwatch"]["cost_median"]
            out["workloads"][w]["verdict"] = {"target": f"<= {target:.0%}", "met": cost <= target}
        counted = sum(c.lookups for c in hook.counts() if c.netns == ns_cookie)
    finally:
        if nsfd >= 0:
            os.close(nsfd)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        for prog in (b, empty):
            if prog is not None:
                prog.cleanup()

    out["lookups_counted_by_sockwatch"] = counted
    print(f"\n{'workload':<11} {'sockwatch':>10} {'floor':>8} {'over floor':>11} {'sockwatch IQR':>18}  target")
    for w, by in out["workloads"].items():
        sw, fl, over = by["sockwatch"], by["floor"], by["over_floor"]
        lo, hi = sw["cost_iqr"]
        met = "met" if by["verdict"]["met"] else "MISSED"
        print(f"{w:<11} {sw['cost_median']:>+10.1%} {fl['cost_median']:>+8.1%} {over['cost_median']:>+11.1%} "
              f"{lo:>+8.1%}..{hi:<+8.1%}  {by['verdict']['target']} {met}")  # fmt: skip
    write_result(args.json_out, out)
    return 0


def profile(cmd: list[str], workload: str, seconds: float, tmp: str) -> int:
    """perf's flat profile of the sender's CPU (0) for `seconds` of `cmd`'s run (a little longer)."""
    data = os.path.join(tmp, "perf.data")
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        subprocess.run(["perf", "record", "-q", "-C", "0", "-o", data, "--", "sleep", str(seconds)], check=True)
    finally:
        rate = json.loads(gen.communicate()[0] or "{}").get("rate")
    print(f"{workload}: {rate} ops/s during the profile", file=sys.stderr)
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym",
                        "--percent-limit", "0.5"], capture_output=True, text=True, check=True)  # fmt: skip
    print("\n".join(line for line in r.stdout.splitlines() if line and not line.startswith("#")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
