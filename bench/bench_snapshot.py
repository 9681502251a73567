"""Snapshot speed at scale, against ss in the same run.

Opens --sockets TCP sockets (spread over processes: one process may hold 20,000 files
here) in a network namespace of its own, then times, each --repeat times:

  ss -tan            the kernel's table, no owners           (baseline for the agent)
  ss -tanp           with owners, by scanning /proc/*/fd     (baseline for standalone)
  sockwatch snapshot --json              asking a running `sockwatch serve`, the table
                                         unchanged since the last ask (a repeated look)
  ... after a change                     one connection opened and closed before each ask
                                         (untimed): the agent reads and renders anew
  sockwatch snapshot --json --standalone reading the kernel itself
  the kernel's dump alone                one sock_diag dump of the namespace's TCP
                                         connections, received and not decoded (timed
                                         inside its process): the floor of any fresh read

and prints min/median and the ratios the issues set (agent <= 1.0x ss -tan, as the
median of ratios of runs taken in turn with it; standalone <= 1.5x ss -tanp), plus the
agent's memory and its CPU while idle.
Everything it creates (namespace, processes, the agent) is removed by id at the end.

  sudo .venv/bin/python bench/bench_snapshot.py --sockets 100000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
SW = [sys.executable, "-m", "sockwatch"]
sys.path.insert(0, HERE)
from bench_cost import proc_cpu_seconds  # noqa: E402
from common import HeldSockets, parse_as_root  # noqa: E402


def timed(cmd: list[str], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def timed_after_change(cmd: list[str], repeat: int, ns: str) -> list[float]:
    """Like timed(), with one TCP connection opened and closed in `ns` before each run
    (not timed): the hooks count a change, so the agent reads the connections again."""
    poke = ["ip", "netns", "exec", ns, sys.executable, "-c",
            "import socket; socket.create_connection(('127.0.0.1', 9000)).close()"]  # fmt: skip
    out = []
    for _ in range(repeat):
        subprocess.run(poke, check=True)
        out += timed(cmd, 1)
    return out


# One sock_diag dump of every TCP connection (the states a connection read asks for),
# received whole and not decoded: what the kernel alone takes. Prints its seconds.
KERNEL_DUMP = """
import socket, struct, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
s.bind((0, 0))
t0 = time.perf_counter()
for fam in (socket.AF_INET, socket.AF_INET6):
    req = struct.pack("=BBBBI48s", fam, 6, 0, 0, 0xFFF & ~(1 << 10), bytes(48))
    s.send(struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req)
    done = False
    while not done:
        d = s.recv(1 << 20)
        off = 0
        while off + 16 <= len(d):
            length, kind = struct.unpack_from("=IH", d, off)
            if kind in (2, 3):
                done = True
                break
            off += (length + 3) & ~3
print(time.perf_counter() - t0)
"""


def kernel_dump(ns: str) -> float:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", KERNEL_DUMP],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return float(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "snapshot.json"))
    args = parse_as_root(ap, {"sockets": (1000, 200_000), "repeat": (3, 50), "idle_seconds": (1, 600)})

    ns = f"sw-bench-{uuid.uuid4().hex[:8]}"
    sock = f"/run/sockwatch-bench/{ns}/agent.sock"
    held_sockets: HeldSockets | None = None
    agent: subprocess.Popen | None = None
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        agent = subprocess.Popen([*SW, "serve", "--socket", sock], stderr=subprocess.PIPE)
        while subprocess.run([*SW, "status", "--socket", sock], check=False, capture_output=True).returncode:
            if agent.poll() is not None:  # hooks are attached once the agent answers
                raise SystemExit(f"agent failed: {agent.stderr.read().decode() if agent.stderr else ''}")
            time.sleep(0.1)

        t0 = time.perf_counter()
        held_sockets = HeldSockets(ns, args.sockets, 9000, net="127.0.0")
        held = held_sockets.held
        opened_s = time.perf_counter() - t0

        def status() -> dict:
            r = subprocess.run([*SW, "status", "--json", "--socket", sock], check=True, capture_output=True, text=True)
            return json.loads(r.stdout)

        t0 = time.perf_counter()
        while (st := status())["pending"] and time.perf_counter() - t0 < 120:
            time.sleep(0.2)
        settle_s = time.perf_counter() - t0

        # in turn, round by round (this VM's speed drifts over minutes): ratios pair by pair
        ss_tan: list[float] = []
        sw_agent: list[float] = []
        sw_changed: list[float] = []
        sync_s: list[float] = []  # the agent's own connection read, in each run after a change
        dump_s: list[float] = []
        for _ in range(args.repeat):
            ss_tan += timed(["ss", "-N", ns, "-tan"], 1)
            sw_agent += timed([*SW, "snapshot", "--json", "--socket", sock], 1)
            sw_changed += timed_after_change([*SW, "snapshot", "--json", "--socket", sock], 1, ns)
            sync_s.append(status()["tracker"]["last_connection_sync_seconds"])
            dump_s.append(kernel_dump(ns))
        ss_tanp = timed(["ss", "-N", ns, "-tanp"], args.repeat)
        sw_alone = timed([*SW, "snapshot", "--json", "--standalone"], args.repeat)

        # the agent's own answer has every socket (and ss agrees on the count)
        answer = subprocess.run([*SW, "snapshot", "--json", "--socket", sock], check=True, capture_output=True)
        rows = json.loads(answer.stdout)["sockets"]
        ss_out = subprocess.run(["ss", "-N", ns, "-tanH"], check=True, capture_output=True, text=True).stdout
        ss_rows = ss_out.count("\n")
        inode = os.stat(f"/run/netns/{ns}").st_ino  # (the agent's table is the host's: count this namespace's)
        mine = sum(1 for r in rows if r["protocol"] == "tcp" and r["netns"] == inode)

        st = status()
        cpu0 = proc_cpu_seconds(agent.pid)
        time.sleep(args.idle_seconds)
        idle_cpu = (proc_cpu_seconds(agent.pid) - cpu0) / args.idle_seconds
        st_after = status()

        def mm(xs: list[float]) -> str:
            return f"min {min(xs):.3f}s  median {statistics.median(xs):.3f}s"

        r_agent = statistics.median(a / b for a, b in zip(sw_agent, ss_tan, strict=True))
        r_changed = statistics.median(a / b for a, b in zip(sw_changed, ss_tan, strict=True))
        r_alone = statistics.median(sw_alone) / statistics.median(ss_tanp)
        r_dump = statistics.median(a / b for a, b in zip(dump_s, ss_tan, strict=True))
        r_sync = statistics.median(a / b for a, b in zip(sync_s, ss_tan, strict=True))
        report = {
            "sockets_held": held,
            "tcp_rows_sockwatch": mine,
            "tcp_rows_ss": ss_rows,
            "open_seconds": round(opened_s, 2),
            "agent_settle_seconds": round(settle_s, 2),
            "ss_tan": sw_round(ss_tan),
            "ss_tanp": sw_round(ss_tanp),
            "sockwatch_agent": sw_round(sw_agent),
            "sockwatch_agent_after_a_change": sw_round(sw_changed),
            "sockwatch_standalone": sw_round(sw_alone),
            "kernel_dump_alone": sw_round(dump_s),
            "agent_connection_read_after_a_change": sw_round(sync_s),
            "ratio_agent_vs_ss_tan": round(r_agent, 3),
            "ratio_agent_after_a_change_vs_ss_tan": round(r_changed, 3),
            "ratio_kernel_dump_alone_vs_ss_tan": round(r_dump, 3),
            "ratio_agent_connection_read_vs_ss_tan": round(r_sync, 3),
            "ratio_standalone_vs_ss_tanp": round(r_alone, 3),
            "ratio_agent_vs_ss_tanp": round(statistics.median(sw_agent) / statistics.median(ss_tanp), 3),
            "agent_rss_mib": round(st["rss_bytes"] / 2**20, 1),
            "agent_rss_idle_mib": round(st_after["rss_bytes"] / 2**20, 1),
            "agent_rss_parts_mib": {k: round(v / 2**20, 1) for k, v in st_after.get("rss_parts_bytes", {}).items()},
            "agent_idle_cpu_percent": round(100 * idle_cpu, 2),
            "agent_bpf": st_after["bpf"],
            "agent_tracker": {k: v for k, v in st_after["tracker"].items() if k != "repaired_cookies"},
        }
        print(f"sockets held: {held} (ss -tan rows {ss_rows}, sockwatch tcp rows {mine}); opened in {opened_s:.1f}s")
        print(f"agent settled (nothing waiting) {settle_s:.1f}s after")
        print(f"ss -tan                          {mm(ss_tan)}")
        print(f"ss -tanp                         {mm(ss_tanp)}")
        print(f"sockwatch snapshot --json (agent) {mm(sw_agent)}   x{r_agent:.2f} of ss -tan   (target <= 1.0)")
        print(f"  ... after a change              {mm(sw_changed)}   x{r_changed:.2f} of ss -tan")
        print(f"      of which the agent's read   {mm(sync_s)}   x{r_sync:.2f} of ss -tan")
        print(f"the kernel's dump alone           {mm(dump_s)}   x{r_dump:.2f} of ss -tan  (the floor of a fresh read)")
        print(f"sockwatch snapshot --json --standalone {mm(sw_alone)}   x{r_alone:.2f} of ss -tanp  (target <= 1.5)")
        rss, idle = report["agent_rss_mib"], report["agent_idle_cpu_percent"]
        print(f"agent: {rss} MiB RSS at {held} sockets; idle CPU {idle}% over {args.idle_seconds:.0f}s")
        print(
            f"agent after {args.idle_seconds:.0f}s idle: {report['agent_rss_idle_mib']} MiB RSS "
            f"(by kind, MiB: {report['agent_rss_parts_mib']})"
        )
        tr = st_after["tracker"]
        print(f"agent reconciles: {tr['reconciles']} in the run, the last took {tr['last_reconcile_seconds']}s of CPU")
        print(f"agent BPF counters: {st_after['bpf']}")
        os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
        return 0
    finally:
        if held_sockets is not None:
            held_sockets.close()
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(agent.pid, signal.SIGKILL)
                agent.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        for path in (sock, sock + ".lock", os.path.dirname(sock), os.path.dirname(os.path.dirname(sock))):
            try:
                os.unlink(path) if path.startswith(sock) else os.rmdir(path)
            except OSError:
                pass


def sw_round(xs: list[float]) -> dict:
    return {"min": round(min(xs), 4), "median": round(statistics.median(xs), 4), "runs": [round(x, 4) for x in xs]}


if __name__ == "__main__":
    sys.exit(main())
