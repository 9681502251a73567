"""What the socket-lookup hook costs a real DNS server, paired (bench/paired.py's method):
unbound answering dnsperf on loopback, one instance in each of three network namespaces
of the benchmark's own (sk_lookup is per namespace, not per cgroup), in turn in 2 s
slices, the order rotating, so that each triple of adjacent slices compares

  hooked  sockwatch's sw_lookup (lookups per destination, UDP peers), compiled and
          attached by the code `serve` uses, with its kfree_skb miss program (host-wide:
          every side pays that one)
  floor   an sk_lookup program that returns at once (the kernel's own dispatch)
  plain   nothing

Every datagram, the query to unbound and the answer to dnsperf, is looked up. The
agent's user-space part costs nothing per packet (counts are read when a view asks),
so no agent runs: the host's other namespaces are untouched. unbound (one thread) runs
on CPU 0, dnsperf on CPU 1. Needs Debian's unbound and dnsperf (scripts/bench.sh dns
installs them). Results: bench/results/dns.json.

  sudo .venv/bin/python bench/bench_dns.py --pairs 31
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from common import host, parse_as_root, stop, write_result
from paired import TRIPLE, run_triples, summary

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
PORT = 5353
TARGET = 0.03

UNBOUND_CONF = """server:
    interface: 127.0.0.1
    port: {port}
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{tmp}"
    pidfile: "{tmp}/unbound-{side}.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    do-ip6: no
    module-config: "iterator"
    access-control: 127.0.0.0/8 allow
    local-zone: "bench.test." static
{records}
remote-control:
    control-enable: no
"""
NAMES = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=31, help="triples of slices")
    ap.add_argument("--seconds", type=float, default=2.0, help="one slice")
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "dns.json"))
    args = parse_as_root(ap, {"pairs": (6, 200), "seconds": (1, 30)})
    for tool in ("unbound", "dnsperf"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing (scripts/bench.sh dns installs it)", file=sys.stderr)
            return 3

    from bcc import BPF  # type: ignore[import-not-found]

    from sockwatch.kernel import bpfload, lookup, prereq, syscalls
    from sockwatch.kernel.links import Links
    from sockwatch.kernel.netns import cookie_of_netns

    prereq.require()
    tag = uuid.uuid4().hex[:8]
    names = {side: f"sw-dns-{side}-{tag}" for side in TRIPLE}
    tmp = tempfile.mkdtemp(prefix="sw-dns-")
    servers: list[subprocess.Popen] = []
    nsfds: list[int] = []
    b = empty = None
    result: dict = {"host": host("bench/bench_dns.py"), "seconds_per_slice": args.seconds, "configs": {}}
    try:
        queries = os.path.join(tmp, "queries")
        with open(queries, "w") as f:
            f.writelines(f"n{i}.bench.test A\n" for i in range(NAMES))
        records = "".join(f'    local-data: "n{i}.bench.test. 3600 IN A 10.9.{i // 256}.{i % 256}"\n'
                          for i in range(NAMES))  # fmt: skip
        for side, ns in names.items():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            conf = os.path.join(tmp, f"unbound-{side}.conf")
            with open(conf, "w") as f:
                f.write(UNBOUND_CONF.format(port=PORT, tmp=tmp, side=side, records=records))
            servers.append(subprocess.Popen(["ip", "netns", "exec", ns, "taskset", "-c", "0", "unbound", "-d", "-c",
                                             conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
        for side, ns in names.items():
            for _ in range(100):
                r = subprocess.run(["ip", "netns", "exec", ns, "dnsperf", "-s", "127.0.0.1", "-p", str(PORT), "-d",
                                    queries, "-n", "1"], check=False, capture_output=True, text=True)  # fmt: skip
                if "Queries completed:    64" in r.stdout:
                    break
                time.sleep(0.2)
            else:
                raise SystemExit(f"bench: unbound ({side}) does not answer: {r.stdout[-500:]}")

        def measure(side: str) -> float:
            r = subprocess.run(["ip", "netns", "exec", names[side], "taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1",
                                "-p", str(PORT), "-d", queries, "-l", f"{args.seconds:g}", "-c", "16", "-T", "1",
                                "-q", "200"], check=True, capture_output=True, text=True)  # fmt: skip
            m = re.search(r"Queries per second:\s+([\d.]+)", r.stdout)
            if m is None:
                raise SystemExit(f"bench: dnsperf said {r.stdout[-500:]!r}")
            return float(m.group(1))

        nsfds.append(os.open(f"/run/netns/{names['hooked']}", os.O_RDONLY | os.O_CLOEXEC))
        nsfds.append(os.open(f"/run/netns/{names['floor']}", os.O_RDONLY | os.O_CLOEXEC))
        b = bpfload.compile_programs(bpfload.Sizes(), bpfload.drop_reasons())
        hook = lookup.LookupHook(b, Links())
        bpfload.load_drop_sites(b)
        miss = next(h for h in bpfload.HOOKS if h.func == "sw_lookup_miss")
        empty = BPF(text="int sw_empty(struct bpf_sk_lookup *ctx) { return SK_PASS; }")
        empty_fn = empty.load_func("sw_empty", lookup.BPF_PROG_TYPE_SK_LOOKUP, attach_type=lookup.BPF_SK_LOOKUP)
        fds = [hook.link(cookie_of_netns(nsfds[0]), nsfds[0]), bpfload.attach_one(b, miss, -1),
               syscalls.link_create(empty_fn.fd, nsfds[1], lookup.BPF_SK_LOOKUP)]  # fmt: skip
        try:
            got = run_triples(measure, args.pairs, "unbound")
        finally:
            for fd in fds:
                os.close(fd)
        for key, ratios in got.items():
            result["configs"][key] = summary(ratios)
        out = result["configs"]
        print(f"unbound: sockwatch {out['sockwatch']['cost_median']:+.1%} floor {out['floor']['cost_median']:+.1%} "
              f"over the floor {out['over_floor']['cost_median']:+.1%}", file=sys.stderr)  # fmt: skip
        cost = out["sockwatch"]["cost_median"]
        result["verdict"] = {"target": f"<= {TARGET:.0%}", "met": cost <= TARGET}
    finally:
        for p in servers:
            stop(p)
        for fd in nsfds:
            os.close(fd)
        for obj in (b, empty):
            if obj is not None:
                obj.cleanup()
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    write_result(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
