"""What merely attaching a sockops program costs TCP connect/accept/close, before any
work of sockwatch's: the floor under the always-on TCP budget.

Interleaved rounds of tcp_crr (bench/loadgen.c, pinned to CPU 0, in a namespace of its
own) with no program, with a sockops program that returns at once, and with one that
only sets the state-callback flag (what the table needs to see closes). No agent runs;
each program is attached by a BPF link for its run and detached after.

  sudo .venv/bin/python bench/bench_hook_floor.py --repeat 9

Results: bench/results/hook_floor.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_cost import Bench
from common import parse_as_root

from sockwatch.kernel import prereq, syscalls

BPF_CGROUP_SOCK_OPS = 3
VARIANTS = {
    "sockops returning at once": "return 1;",
    "sockops setting the state-callback flag": (
        "if (o->op == BPF_SOCK_OPS_TCP_CONNECT_CB || o->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)"
        " bpf_sock_ops_cb_flags_set(o, o->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG); return 1;"
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--json-out", default=os.path.join(os.path.dirname(__file__), "results", "hook_floor.json"))
    args = parse_as_root(ap)
    if not (3 <= args.repeat <= 100 and 0.2 <= args.seconds <= 60):
        print("bench: --repeat 3..100, --seconds 0.2..60", file=sys.stderr)
        return 2
    from bcc import BPF

    prereq.require()
    progs = {name: BPF(text="int so(struct bpf_sock_ops *o) {" + body + "}", cflags=["-w"])
             for name, body in VARIANTS.items()}  # fmt: skip
    cg = os.open(prereq.cgroup2_path() or "/sys/fs/cgroup", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    b = Bench(args.seconds)
    runs: dict[str, list[float]] = {"no program": [], **{name: [] for name in VARIANTS}}
    try:
        b.setup()
        for rnd in range(args.repeat):
            order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
            for name in order:
                link = -1
                if name in progs:
                    fn = progs[name].load_func("so", BPF.SOCK_OPS)
                    link = syscalls.link_create(fn.fd, cg, BPF_CGROUP_SOCK_OPS)
                try:
                    runs[name].append(b.run("tcp_crr"))
                finally:
                    if link >= 0:
                        os.close(link)
            print(f"round {rnd + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        b.cleanup()
        os.close(cg)
        for p in progs.values():
            p.cleanup()
    base = statistics.median(runs["no program"])
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "repeat": args.repeat,
        "seconds_per_run": args.seconds,
        "tcp_crr": {
            name: {
                "min": min(xs),
                "median": statistics.median(xs),
                "loss_of_medians": round(1 - statistics.median(xs) / base, 4),
            }
            for name, xs in runs.items()
        },
    }
    for name, r in result["tcp_crr"].items():
        print(f"{name:42s} min {r['min']:9.0f}  median {r['median']:9.0f}  loss {r['loss_of_medians']:6.1%}")
    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
