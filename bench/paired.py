"""The paired A/B instrument under the cost benchmarks.

These VMs drift up to 2.5x over minutes, so "with" and "without" are never measured in
separate rounds. One agent (or one bare program) runs throughout with its cgroup hooks
on a `hooked` sub-cgroup; the same workload runs alternately there and in a `plain`
sibling in short slices, and each pair of adjacent slices gives one ratio. The figure is
the median of the pair ratios, with its interquartile range and a distribution-free
95% confidence interval (order statistics of the binomial), so drift cancels within a
pair instead of landing in the result.

The agent attaches to `hooked` only: it runs in a cgroup namespace rooted there, with
cgroup2 mounted in a mount namespace of its own (`serve --cgroup-root`). Nothing is
mounted on the host; every cgroup, process and namespace made here is removed by id.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

from sockwatch.kernel import prereq  # noqa: E402

SIDES = ("hooked", "plain")
# With the floor measured in the same slices: sockwatch's hooks, a bare sockops program
# and nothing, side by side, so that "how far above the floor" is itself paired.
TRIPLE = ("hooked", "floor", "plain")


def in_cgroup(cgroup: str, cmd: list[str]) -> list[str]:
    """`cmd`, started in `cgroup` (the shell moves itself, then execs)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *cmd]


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: the order statistics
    whose binomial(n, 1/2) coverage reaches `level` (n >= 6)."""
    s, n = sorted(xs), len(xs)
    best = (s[0], s[-1])
    for k in range(n // 2):
        cover = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        if cover < level:
            break
        best = (s[k], s[n - 1 - k])
    return best


def summary(ratios: list[float]) -> dict:
    """Cost = 1 - hooked/plain, per pair; the median and its spread."""
    costs = sorted(1 - r for r in ratios)
    q = statistics.quantiles(costs, n=4) if len(costs) >= 2 else [costs[0]] * 3
    lo, hi = median_ci(costs)
    return {
        "pairs": len(costs),
        "cost_median": round(statistics.median(costs), 4),
        "cost_iqr": [round(q[0], 4), round(q[2], 4)],
        "cost_ci95": [round(lo, 4), round(hi, 4)],
        "ratios": [round(r, 4) for r in ratios],
    }


@dataclass
class Cgroups:
    """hooked/, floor/ and plain/ under a sub-tree of the host's cgroup2 hierarchy."""

    base: str

    @classmethod
    def make(cls) -> Cgroups:
        root = prereq.cgroup2_path()
        if root is None:
            raise SystemExit("bench: no cgroup v2 mount")
        base = os.path.join(root, f"sockwatch-bench-{uuid.uuid4().hex[:8]}")
        os.mkdir(base)
        for side in TRIPLE:
            os.mkdir(os.path.join(base, side))
        return cls(base)

    @property
    def hooked(self) -> str:
        return self.side("hooked")

    @property
    def floor(self) -> str:
        return self.side("floor")

    def side(self, name: str) -> str:
        if name not in TRIPLE:
            raise ValueError(name)
        return os.path.join(self.base, name)

    def remove(self) -> None:
        """Every process left in them is killed first (a cgroup with members cannot go)."""
        for d in (*(self.side(s) for s in TRIPLE), self.base):
            procs = os.path.join(d, "cgroup.procs")
            for _ in range(50):
                try:
                    with open(procs) as f:
                        pids = [int(p) for p in f.read().split()]
                except OSError:
                    break
                if not pids:
                    break
                for p in pids:
                    try:
                        os.kill(p, 9)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            try:
                os.rmdir(d)
            except OSError as e:
                print(f"bench: could not remove {d}: {e}", file=sys.stderr)


class HookedAgent:
    """`sockwatch serve` with its cgroup hooks on `cgroups.hooked` only."""

    def __init__(self, cgroups: Cgroups, extra: tuple[str, ...] = ()) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sw-paired-")
        self.sock = os.path.join(self.tmp, "agent.sock")
        mnt = os.path.join(self.tmp, "cgroup")
        os.mkdir(mnt)
        serve = [sys.executable, "-m", "sockwatch", "serve", "--socket", self.sock, "--listen", "off", *extra]
        inner = 'mount -t cgroup2 cgroup2 "$0" && SOCKWATCH_CGROUP_ROOT="$0" exec "$@"'
        cmd = in_cgroup(cgroups.hooked, ["unshare", "--cgroup", "--mount", "--propagation", "private",
                                         "sh", "-c", inner, mnt, *serve])  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=os.path.dirname(HERE))
        self.status()

    def status(self, timeout: float = 120) -> dict:
        import json

        end = time.monotonic() + timeout
        while True:
            r = subprocess.run([sys.executable, "-m", "sockwatch", "status", "--json", "--socket", self.sock],
                               check=False, capture_output=True, cwd=os.path.dirname(HERE))  # fmt: skip
            if r.returncode == 0:
                return json.loads(r.stdout)
            if self.proc.poll() is not None or time.monotonic() > end:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"bench: the agent did not start: {err.strip()[-2000:]}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        common.stop(self.proc, 20)
        shutil.rmtree(self.tmp, ignore_errors=True)


class BareSockops:
    """The kernel's floor for seeing TCP at all: a sockops program that only sets the
    state-callback flag, on one of `cgroups` (the floor side), attached by a link."""

    SRC = (
        "int so(struct bpf_sock_ops *o) {"
        " if (o->op == BPF_SOCK_OPS_TCP_CONNECT_CB || o->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)"
        " bpf_sock_ops_cb_flags_set(o, o->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);"
        " return 1; }"
    )

    def __init__(self, cgroups: Cgroups, side: str = "floor") -> None:
        from bcc import BPF  # type: ignore[import-not-found]

        from sockwatch.kernel import syscalls

        self.bpf = BPF(text=self.SRC, cflags=["-w"])
        fn = self.bpf.load_func("so", BPF.SOCK_OPS)
        cg = os.open(cgroups.side(side), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.link = syscalls.link_create(fn.fd, cg, 3)  # BPF_CGROUP_SOCK_OPS
        finally:
            os.close(cg)

    def stop(self) -> None:
        os.close(self.link)
        self.bpf.cleanup()


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def run_pairs(measure: Callable[[str], float], pairs: int, progress: str = "") -> list[float]:
    """`pairs` ratios hooked/plain, the order alternating pair by pair; `measure(side)`
    runs one slice and returns its throughput."""
    ratios = []
    for i in range(pairs):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        got = {side: measure(side) for side in order}
        ratios.append(got["hooked"] / got["plain"] if got["plain"] > 0 else float("nan"))
        if progress:
            print(f"{progress}: pair {i + 1}/{pairs}: {got['hooked']:.0f} vs {got['plain']:.0f} "
                  f"({1 - ratios[-1]:+.1%})", file=sys.stderr)  # fmt: skip
    return [r for r in ratios if not math.isnan(r)]


def run_triples(measure: Callable[[str], float], triples: int, progress: str = "") -> dict[str, list[float]]:
    """Ratios per triple of adjacent slices (hooked, floor, plain; the order rotates
    through all six): "sockwatch" hooked/plain, "floor" floor/plain, "over_floor"
    hooked/floor."""
    orders = list(itertools.permutations(TRIPLE))
    out: dict[str, list[float]] = {"sockwatch": [], "floor": [], "over_floor": []}
    for i in range(triples):
        got = {side: measure(side) for side in orders[i % len(orders)]}
        if min(got.values()) <= 0:
            continue
        out["sockwatch"].append(got["hooked"] / got["plain"])
        out["floor"].append(got["floor"] / got["plain"])
        out["over_floor"].append(got["hooked"] / got["floor"])
        if progress:
            print(f"{progress}: {i + 1}/{triples}: sockwatch {1 - out['sockwatch'][-1]:+.1%} "
                  f"floor {1 - out['floor'][-1]:+.1%}", file=sys.stderr)  # fmt: skip
    return out
