"""Load the agent holds: TCP connection churn plus UDP socket churn, with two idle
clients connected and a snapshot every second; afterwards the table must equal ss, the
BPF owner map must hold no stale entries, every lost event must be counted, and the
agent's memory must be back within 10% of where it started.

  sudo .venv/bin/python bench/bench_churn.py                      # 60 s at 10,000 TCP cycles/s
  sudo .venv/bin/python bench/bench_churn.py --seconds 600 --tcp-rate 2000 --udp-rate 500   # the soak

Everything it creates (namespace, processes, the agent) is removed by id at the end.
Results: bench/results/churn.json (or soak.json with --soak-name).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cost import SW, Bench, proc_cpu_seconds, proc_rss_mib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import parse_as_root

from tests.kernel import oracle


def idle_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def dropped(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--tcp-rate", type=float, default=10_000, help="TCP connect/accept/close cycles per second")
    ap.add_argument("--udp-rate", type=float, default=2_000, help="UDP socket()+sendto()+close() per second")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after the load before comparing with ss")
    ap.add_argument("--json-out", default=None)
    args = parse_as_root(ap, {"seconds": (1, 3600), "tcp_rate": (1, 1e6), "udp_rate": (0, 1e6)})
    out_path = args.json_out or os.path.join(os.path.dirname(__file__), "results", "churn.json")
    b = Bench(args.seconds)
    clients: list[socket.socket] = []
    loads: list[subprocess.Popen] = []
    ok = False
    try:
        b.setup()
        pid = b.start_agent()
        time.sleep(2)
        rss0, cpu0, t0 = proc_rss_mib(pid), proc_cpu_seconds(pid), time.monotonic()
        base = ["ip", "netns", "exec", b.ns, *b.pin, b.loadgen]
        loads.append(subprocess.Popen([*base, "tcp_crr", "127.0.0.1", "9000", str(args.seconds), str(args.tcp_rate)],
                                      stdout=subprocess.PIPE, text=True))  # fmt: skip
        if args.udp_rate:
            loads.append(subprocess.Popen([*base, "udp_churn", "127.0.0.1", "9001", str(args.seconds),
                                           str(args.udp_rate)], stdout=subprocess.PIPE, text=True))  # fmt: skip
        clients = [idle_client(b.sock), idle_client(b.sock)]
        reconnects, snap_times, snap_failures = 0, [], 0
        while any(p.poll() is None for p in loads):
            for i, c in enumerate(clients):  # the agent drops idle clients after 5 s: come back
                if dropped(c):
                    c.close()
                    clients[i] = idle_client(b.sock)
                    reconnects += 1
            s0 = time.monotonic()
            r = subprocess.run([*SW, "snapshot", "--json", "--socket", b.sock], capture_output=True, check=False)
            snap_times.append(time.monotonic() - s0)
            snap_failures += r.returncode != 0
            time.sleep(max(0.0, 1.0 - (time.monotonic() - s0)))
        rates = [json.loads(p.communicate()[0])["rate"] for p in loads]
        cpu_s = proc_cpu_seconds(pid) - cpu0
        load_s = time.monotonic() - t0
        time.sleep(args.settle)
        inode = os.stat(f"/run/netns/{b.ns}").st_ino
        r = subprocess.run([*SW, "snapshot", "--json", "--netns", str(inode), "--socket", b.sock],
                           capture_output=True, check=True, text=True)  # fmt: skip
        ours = {oracle.key_of(x) for x in json.loads(r.stdout)["sockets"]}  # (proto, local, remote, state, inode)
        theirs = {s.key for s in oracle.ss(b.ns)}
        st = b.status()
        time.sleep(3)
        rss1 = proc_rss_mib(pid)
        result = {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
            "seconds": args.seconds,
            "tcp_rate_asked": args.tcp_rate,
            "udp_rate_asked": args.udp_rate,
            "rates_reached": rates,
            "agent_cpu_percent": round(100 * cpu_s / load_s, 2),
            "snapshots": len(snap_times),
            "snapshot_failures": snap_failures,
            "snapshot_seconds_median": round(statistics.median(snap_times), 3) if snap_times else None,
            "snapshot_seconds_max": round(max(snap_times), 3) if snap_times else None,
            "idle_clients_dropped_and_back": reconnects,
            "table_equals_ss": ours == theirs,
            "only_in_sockwatch": sorted(map(str, ours - theirs))[:20],
            "only_in_ss": sorted(map(str, theirs - ours))[:20],
            "kernel_reads": st["tracker"]["kernel_reads"],
            "events": st["bpf"]["events"],
            "lost_ring": st["bpf"]["ringbuf_full"],
            "resyncs": st["tracker"]["resyncs"],
            "rss_mib_start": round(rss0, 1),
            "rss_mib_after": round(rss1, 1),
            "rss_growth_percent": round(100 * (rss1 - rss0) / rss0, 1),
        }
        ok = (
            result["table_equals_ss"]
            and result["snapshot_failures"] == 0
            and result["lost_ring"] == 0
            and result["rss_growth_percent"] <= 10
        )
        result["held"] = ok
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
        for k, v in result.items():
            print(f"{k:32s} {v}")
        print(f"results: {out_path}")
    finally:
        for c in clients:
            c.close()
        for p in loads:
            if p.poll() is None:
                p.kill()
                p.wait()
        b.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
