"""What several benchmarks share: many TCP sockets held in a namespace by worker
processes (one process may hold at most 20,000 files here), the host's facts, and the
results file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sockets_worker.py")
PER_PROCESS = 16_000


class HeldSockets:
    """`n` TCP sockets (both ends of n/2 loopback connections, plus a listener per
    worker) in namespace `ns`, on `port` of 127.0.x.y addresses, until close()."""

    def __init__(self, ns: str, n: int, port: int, net: str = "127.0.1") -> None:
        self.workers: list[subprocess.Popen] = []
        left, i = n, 0
        while left > 0:
            count = min(PER_PROCESS, left)
            self.workers.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, WORKER, str(count), str(port), f"{net}.{1 + i}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
            left -= count
            i += 1
        self.held = sum(int(w.stdout.readline()) for w in self.workers if w.stdout)

    def close(self) -> None:
        for w in self.workers:
            if w.stdin:
                w.stdin.close()
        for w in self.workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(w.pid, signal.SIGKILL)
                w.wait()


def stop(p: subprocess.Popen, seconds: float = 10, sig: int = signal.SIGTERM) -> None:
    """Ask a process of the benchmark's own to end, then make it."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(seconds)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def parse_as_root(
    ap: argparse.ArgumentParser,
    bounds: dict[str, tuple[float, float]] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> argparse.Namespace:
    """The benchmark's arguments, checked: `bounds` (dest -> (low, high), inclusive) and
    `choices` (dest of a comma-separated list -> what it may name); one line naming what
    is allowed and exit 2 if not. A benchmark loads BPF and makes namespaces: root only."""
    args = ap.parse_args()
    bad = [f"--{k.replace('_', '-')} {lo:g}..{hi:g}" for k, (lo, hi) in (bounds or {}).items()
           if not lo <= getattr(args, k) <= hi]  # fmt: skip
    for k, allowed in (choices or {}).items():
        named = [x for x in getattr(args, k).split(",") if x]
        if not named or any(x not in allowed for x in named):
            bad.append(f"--{k.replace('_', '-')} from {','.join(allowed)}")
    if bad:
        print(f"bench: {'; '.join(bad)}", file=sys.stderr)
        raise SystemExit(2)
    if os.geteuid() != 0:
        print("bench: run as root (sudo)", file=sys.stderr)
        raise SystemExit(3)
    # Stopped by a signal, a benchmark still removes what it made (its finally blocks
    # run); SIGINT too, which a shell ignores in a background job.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    return args


def _interrupted(sig: int, _frame: object) -> None:
    raise SystemExit(f"bench: stopped by signal {sig}; cleaning up")


def host(command: str) -> dict:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command + " " + " ".join(sys.argv[1:]),
    }


def write_result(path: str, result: dict) -> None:
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
