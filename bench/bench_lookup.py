"""What the socket-lookup hook costs a flood: the same workload with nothing attached,
with an empty sk_lookup program (the kernel's own dispatch: the floor any sk_lookup
program pays), with sockwatch's kfree_skb program alone (what a drop costs it), and
with sockwatch's (sw_lookup counting lookups and UDP peers, plus
sw_lookup_miss on kfree_skb), and with sockwatch's built as `serve --max-udp-peers 0`
builds them, interleaved, min and median of --repeat runs.

  udp_sendto  a C sender's unconnected 64-byte datagrams to an unconnected socket that
              never reads: every datagram is dropped at its full queue, so the miss
              program on kfree_skb runs for each (the whole receive path, lookup
              included, runs on the sender's CPU)
  udp_read    the same flood, every datagram read by its server (none dropped)
  tcp_crr     connect/accept/close cycles (one lookup per SYN)

The programs are sockwatch's own, compiled and attached by the same code `serve` uses,
to a namespace of the benchmark's own only (no agent runs: the host's other namespaces
are untouched). Everything it creates (namespace, links, programs, the compiled load
generator) is removed at the end. Results: bench/results/lookup.json.

  sudo .venv/bin/python bench/bench_lookup.py --repeat 7 --seconds 2
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
import statistics
import subprocess
import sys
import tempfile
import uuid

from common import host, parse_as_root, write_result

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = ("none", "empty sk_lookup", "kfree_skb alone", "sockwatch", "sockwatch, no peers")
TARGETS = {"udp_sendto": 0.03, "udp_read": 0.03, "tcp_crr": 0.05}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7, help="rounds (>= 5 for figures)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "lookup.json"))
    ap.add_argument("--profile", choices=CONFIGS, help="profile one config with perf instead of comparing")
    ap.add_argument("--workload", choices=list(TARGETS), default="udp_read", help="the workload --profile runs")
    args = parse_as_root(ap)
    if args.profile and shutil.which("perf") is None:
        print("bench: --profile needs perf (Debian's linux-perf)", file=sys.stderr)
        return 2
    if not 1 <= args.repeat <= 100 or not 0.2 <= args.seconds <= 60:
        print("bench: --repeat 1..100; --seconds 0.2..60", file=sys.stderr)
        return 2

    from bcc import BPF

    from sockwatch.kernel import bpfload, lookup, syscalls
    from sockwatch.kernel.links import Links
    from sockwatch.kernel.netns import cookie_of_netns

    ns = f"sw-lookup-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.mkdtemp(prefix="sw-lookup-")
    loadgen = os.path.join(tmp, "loadgen")
    pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
    b = b_np = empty = None
    nsfd = -1
    results: dict[str, dict[str, list[float]]] = {w: {c: [] for c in CONFIGS} for w in TARGETS}
    try:
        subprocess.run(["gcc", "-O2", "-o", loadgen, os.path.join(HERE, "loadgen.c")], check=True)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        ns_cookie = cookie_of_netns(nsfd)
        b = bpfload.compile_programs(bpfload.Sizes(), bpfload.no_socket_reason())
        hook = lookup.LookupHook(b, Links())
        b_np = bpfload.compile_programs(bpfload.Sizes(max_udp_peers=0), bpfload.no_socket_reason())
        hook_np = lookup.LookupHook(b_np, Links())
        for obj in (b, b_np):
            bpfload.load_drop_sites(obj)
        miss = next(h for h in bpfload.HOOKS if h.func == "sw_lookup_miss")
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
            elif config == "sockwatch":
                fds.append(hook.link(ns_cookie, nsfd))
                fds.append(bpfload.attach_one(b, miss, -1))
            elif config == "sockwatch, no peers":
                fds.append(hook_np.link(ns_cookie, nsfd))
                fds.append(bpfload.attach_one(b_np, miss, -1))
            return fds

        if args.profile:
            fds = attach(args.profile)
            try:
                return profile(gen(args.workload, args.seconds + 1), args.workload, args.seconds, tmp)
            finally:
                for fd in fds:
                    os.close(fd)

        for rnd in range(args.repeat):
            for config in CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]:
                fds = attach(config)
                try:
                    for w in TARGETS:
                        results[w][config].append(run(w))
                finally:
                    for fd in fds:
                        os.close(fd)
            print(f"round {rnd + 1}/{args.repeat} done", file=sys.stderr)
        counted = sum(c.lookups for c in hook.counts() if c.netns == ns_cookie)
    finally:
        if nsfd >= 0:
            os.close(nsfd)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        for prog in (b, b_np, empty):
            if prog is not None:
                prog.cleanup()

    out: dict = {"host": host("bench/bench_lookup.py"), "seconds_per_run": args.seconds, "repeat": args.repeat,
                 "lookups_counted_by_sockwatch": counted, "workloads": {}}  # fmt: skip
    print(f"\n{'workload':<11} {'config':<20} {'min':>10} {'median':>10} {'vs none':>8} {'ns/op':>6}  target")
    for w, by in results.items():
        base = statistics.median(by["none"])
        out["workloads"][w] = {}
        for config, xs in by.items():
            med = statistics.median(xs)
            loss = 1 - med / base
            verdict = ""
            if config.startswith("sockwatch"):
                verdict = f"<= {TARGETS[w]:.0%} " + ("met" if loss <= TARGETS[w] else "MISSED")
            extra_ns = 1e9 / med - 1e9 / base  # what each operation took longer, in ns
            out["workloads"][w][config] = {"min": min(xs), "median": med, "runs": xs, "loss": round(loss, 4),
                                           "ns_per_op": round(extra_ns, 1)}  # fmt: skip
            print(f"{w:<11} {config:<20} {min(xs):>10.0f} {med:>10.0f} {-loss:>+8.1%} {extra_ns:>+6.0f}  {verdict}")
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
