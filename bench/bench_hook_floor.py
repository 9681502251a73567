"""What merely attaching a sockops program costs TCP connect/accept/close, before any
work of sockwatch's: the floor under the always-on TCP budget.

tcp_crr (bench/loadgen.c, pinned to CPU 0, in a namespace of its own) paired as
bench/paired.py pairs: short slices in turn with a sockops program that only sets the
state-callback flag (what the table needs to see closes), with one that returns at
once, and with none, the order rotating; each triple of adjacent slices gives each
program's cost against none and the flag's over the bare dispatch. No agent runs; each
program is attached by a BPF link for its slice and detached after.

  sudo .venv/bin/python bench/bench_hook_floor.py --triples 21

Results: bench/results/hook_floor.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_cost import Bench
from common import parse_as_root
from paired import run_triples, summary

from sockwatch.kernel import prereq, syscalls

BPF_CGROUP_SOCK_OPS = 3
VARIANTS = {  # the triple's sides: "hooked" is the flag's, "floor" the bare dispatch, "plain" none
    "floor": "return 1;",
    "hooked": (
        "if (o->op == BPF_SOCK_OPS_TCP_CONNECT_CB || o->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)"
        " bpf_sock_ops_cb_flags_set(o, o->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG); return 1;"
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triples", type=int, default=21)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--json-out", default=os.path.join(os.path.dirname(__file__), "results", "hook_floor.json"))
    args = parse_as_root(ap, {"triples": (6, 1000), "seconds": (0.2, 60)})
    from bcc import BPF

    prereq.require()
    progs = {side: BPF(text="int so(struct bpf_sock_ops *o) {" + body + "}", cflags=["-w"])
             for side, body in VARIANTS.items()}  # fmt: skip
    fns = {side: p.load_func("so", BPF.SOCK_OPS) for side, p in progs.items()}
    cg = os.open(prereq.cgroup2_path() or "/sys/fs/cgroup", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    b = Bench(args.seconds)

    def measure(side: str) -> float:
        link = syscalls.link_create(fns[side].fd, cg, BPF_CGROUP_SOCK_OPS) if side in fns else -1
        try:
            return b.run("tcp_crr")
        finally:
            if link >= 0:
                os.close(link)

    try:
        b.setup()
        got = run_triples(measure, args.triples, "tcp_crr")
    finally:
        b.cleanup()
        os.close(cg)
        for p in progs.values():
            p.cleanup()
    names = {"sockwatch": "state-callback flag vs none", "floor": "returning at once vs none",
             "over_floor": "state-callback flag vs returning at once"}  # fmt: skip
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "seconds_per_slice": args.seconds,
        "tcp_crr": {names[k]: summary(v) for k, v in got.items()},
    }
    for name, r in result["tcp_crr"].items():
        lo, hi = r["cost_iqr"]
        print(f"{name:42s} cost {r['cost_median']:+6.1%}  (IQR {lo:+.1%}..{hi:+.1%})")
    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
