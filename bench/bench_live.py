"""`sockwatch live` and `sockwatch events` on a busy host: 100,000 sockets held, TCP
connect/accept/close paced at 10,000 cycles/s on loopback, for a bounded time.

Measured, all in one run:
- live (tmux, 80x24, --refresh 1): its CPU, and how long a key takes to show (the view
  switch keys, pressed while the load runs; time until the screen shows the new view);
- events --json: lines received against the records the hooks submitted, and losses
  (the agent's counters, and 'lost' lines in the stream);
- the agent's CPU at the same load with and without live and events attached;
- TCP crr at full speed with the agent alone and with live and events attached,
  interleaved rounds (the always-on cost with the views open).

  sudo .venv/bin/python bench/bench_live.py            # ~4 minutes
  sudo .venv/bin/python bench/bench_live.py --seconds 10 --sockets 20000 --repeat 3

Results: bench/results/live.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cost import SW, Bench, proc_cpu_seconds
from common import HeldSockets, host, parse_as_root, write_result

HERE = os.path.dirname(os.path.abspath(__file__))


class EventsReader:
    """`sockwatch events --json`, its lines counted as they arrive."""

    def __init__(self, sock: str) -> None:
        self.proc = subprocess.Popen([*SW, "events", "--json", "--socket", sock], stdout=subprocess.PIPE)
        self.lines = 0
        self.lost = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines += 1
            if b'"kind":"lost"' in line:
                self.lost += json.loads(line)["events"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class LiveInTmux:
    def __init__(self, sock: str) -> None:
        self.name = f"sw-bench-live-{uuid.uuid4().hex[:8]}"
        cmd = " ".join(["exec", "env", "-u", "COLUMNS", "-u", "LINES", *SW, "live", "--socket", sock, "--refresh", "1"])
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "80", "-y", "24", cmd], check=True)
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", "80", "-y", "24"], check=True)
        out = subprocess.run(["tmux", "display", "-p", "-t", self.name, "#{pane_pid}"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        self.pid = int(out.stdout)
        self.wait_for("[1] Listeners", 60)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip

    def wait_for(self, text: str, timeout: float) -> float:
        t0 = time.perf_counter()
        while text not in self.screen():
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"bench: live did not show {text!r} in {timeout}s")
            time.sleep(0.005)
        return time.perf_counter() - t0

    def key_latency(self, presses: int) -> list[float]:
        out = []
        for i in range(presses):
            key, title = ("2", "[2] Connections") if i % 2 == 0 else ("1", "[1] Listeners")
            t0 = time.perf_counter()
            subprocess.run(["tmux", "send-keys", "-t", self.name, key], check=True)
            self.wait_for(title, 10)
            out.append(time.perf_counter() - t0)
            time.sleep(0.3)
        return out

    def stop(self) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "q"], check=False)
        time.sleep(1)
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=30.0, help="each paced phase")
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="full-speed crr rounds each way")
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "live.json"))
    args = parse_as_root(ap, {"sockets": (1000, 200_000), "seconds": (5, 300), "repeat": (1, 20)})
    b = Bench(1.5)
    held_sockets: HeldSockets | None = None
    readers: list[EventsReader] = []
    lives: list[LiveInTmux] = []
    result: dict = {}
    try:
        b.setup()
        agent_pid = b.start_agent()
        held_sockets = HeldSockets(b.ns, args.sockets, 9100)
        held = held_sockets.held
        t0 = time.monotonic()
        while b.status()["pending"] and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        print(f"bench: {held} sockets held; agent settled", file=sys.stderr)

        def paced(with_views: bool) -> dict:
            st0, cpu0 = b.status(), proc_cpu_seconds(agent_pid)
            live_cpu0 = proc_cpu_seconds(lives[0].pid) if with_views else 0.0
            lines0 = readers[0].lines if with_views else 0
            t = time.monotonic()
            latency: list[float] = []
            if with_views:
                done = threading.Event()
                th = threading.Thread(target=lambda: (time.sleep(args.seconds / 3), latency.extend(
                    lives[0].key_latency(10)), done.set()))  # fmt: skip
                th.start()
            rate = b.run("tcp_crr", args.seconds, args.rate)
            span = time.monotonic() - t
            if with_views:
                th.join()
            time.sleep(1.5)  # the agent's next tick reads the counters and streams what is left
            st1 = b.status()
            out = {
                "cycles_per_second": rate,
                "agent_cpu_percent": round(100 * (proc_cpu_seconds(agent_pid) - cpu0) / span, 2),
                "records": st1["bpf"]["events"] - st0["bpf"]["events"],
                "ring_lost": st1["bpf"]["ringbuf_full"] - st0["bpf"]["ringbuf_full"],
            }
            if with_views:
                out |= {
                    "live_cpu_percent": round(100 * (proc_cpu_seconds(lives[0].pid) - live_cpu0) / span, 2),
                    "key_to_screen_seconds": {
                        "median": statistics.median(latency),
                        "max": max(latency),
                        "runs": [round(x, 4) for x in latency],
                    },
                    "events_streamed": readers[0].lines - lines0,
                    "lost_lines_total": readers[0].lost,
                    "events_reader_alive": readers[0].proc.poll() is None,
                }
            return out

        result["paced_agent_only"] = paced(False)
        readers.append(EventsReader(b.sock))
        lives.append(LiveInTmux(b.sock))
        result["paced_with_live_and_events"] = paced(True)
        print("bench: paced phases done", file=sys.stderr)

        full: dict[str, list[float]] = {"agent only": [], "agent + live + events": []}
        for rnd in range(args.repeat):
            for name in list(full) if rnd % 2 == 0 else list(reversed(full)):
                attached = bool(readers)
                if name == "agent only" and attached:
                    readers.pop().stop()
                    lives.pop().stop()
                elif name != "agent only" and not attached:
                    readers.append(EventsReader(b.sock))
                    lives.append(LiveInTmux(b.sock))
                full[name].append(b.run("tcp_crr"))
        base = statistics.median(full["agent only"])
        result["full_speed_crr"] = {
            name: {"median": statistics.median(xs), "min": min(xs), "runs": xs} for name, xs in full.items()
        }
        result["full_speed_crr"]["ratio_median"] = round(statistics.median(full["agent + live + events"]) / base, 4)
        result["setup"] = {"sockets_held": held, "seconds": args.seconds, "rate": args.rate, "repeat": args.repeat,
                           **host("sudo .venv/bin/python bench/bench_live.py")}  # fmt: skip
    finally:
        for r in readers:
            r.stop()
        for lv in lives:
            lv.stop()
        if held_sockets is not None:
            held_sockets.close()
        b.cleanup()
    write_result(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
