"""The socket-lookup hook against real packets: exact counts of lookups and misses,
UDP peers with their packet counts, namespaces hooked when they appear and released
when they go, and traffic delivered to the same sockets with the hook as without."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sockwatch.kernel import bpflinks
from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import AgentProc, Netns

HOOKED_WITHIN = 5.0  # seconds: the agent looks for new namespaces every second

# Run inside the test's namespace, pinned to one CPU: the loopback packets are then
# received on that CPU too, so the raw ICMP echo at the end follows a lookup that found
# its socket on the same CPU (a drop for no socket there must not be taken for a miss).
TRAFFIC = r"""
import json, os, socket, struct, sys
os.sched_setaffinity(0, {0})
spec = json.loads(sys.argv[1])
out = {}
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 5353))
server6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
server6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
server6.bind(("::1", 5353))
listener = socket.socket()
listener.bind(("127.0.0.1", 8080))
listener.listen(64)
cookie = lambda s: int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")
out["server"], out["server6"], out["listener"] = cookie(server), cookie(server6), cookie(listener)
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 40001))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(("127.0.0.1", 40002))
c6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); c6.bind(("::1", 40003))
for _ in range(spec["closed_udp"]):
    a.sendto(b"x", ("127.0.0.1", 5354))
for port, family, n in ((8081, socket.AF_INET, spec["closed_tcp"]), (8082, socket.AF_INET6, spec["closed_tcp6"])):
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect(("127.0.0.1" if family == socket.AF_INET else "::1", port))
        except ConnectionRefusedError:
            pass
        s.close()
for _ in range(spec["tcp"]):
    s = socket.create_connection(("127.0.0.1", 8080))
    listener.accept()[0].close()
    s.close()
for _ in range(spec["udp6"]):
    c6.sendto(b"x", ("::1", 5353))
for _ in range(spec["udp_b"]):
    b.sendto(b"x", ("127.0.0.1", 5353))
for _ in range(spec["udp_a"]):
    a.sendto(b"x", ("127.0.0.1", 5353))  # the last lookup: it found its socket
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
body = struct.pack("!BBHHH", 8, 0, 0, 0x5357, 1) + b"sockwatch!"  # an even length
csum = sum(struct.unpack("!%dH" % (len(body) // 2), body))
csum = (csum >> 16) + (csum & 0xFFFF); csum = ~(csum + (csum >> 16)) & 0xFFFF
icmp.sendto(body[:2] + struct.pack("!H", csum) + body[4:], ("127.0.0.1", 0))
icmp.recv(1024)  # the echo reply: no ping socket wants it, the kernel drops it for NO_SOCKET
print(json.dumps(out), flush=True)
sys.stdin.readline()  # the sockets stay open until the test has looked
"""


def _sw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(sockwatch_cmd(*args), check=False, capture_output=True, text=True)


def _ours(inode: int | None) -> list[int]:
    """Link ids of sockwatch's own sk_lookup program in the namespace (None: anywhere)."""
    return [link for link, _prog, name in bpflinks.sk_lookup_links(inode) if name == bpflinks.OBSERVER]


def _until(what: str, check, seconds: float = HOOKED_WITHIN):
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"{what} within {seconds:g} s"
            return got
        time.sleep(0.1)


def _report(op: str, agent: AgentProc, netns: Netns) -> dict:
    r = _sw("snapshot", f"--{op}", "--json", "--netns", str(netns.inode), "--socket", agent.socket)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_counts_lookups_misses_and_peers_exactly(agent: AgentProc, netns: Netns) -> None:
    """A namespace made after the agent started is hooked within seconds; then N
    datagrams and M connection attempts to known ports give exactly those counts,
    closed ports their misses, and the UDP server its peers with their packets."""
    _until("the new namespace hooked", lambda: _ours(netns.inode))
    events = subprocess.Popen(sockwatch_cmd("events", "--json", "--kind", "miss", "--netns", str(netns.inode),
                                            "--socket", agent.socket), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _traffic_and_stream(agent, netns, events)
    finally:
        events.terminate()
        events.wait(30)


def _traffic_and_stream(agent: AgentProc, netns: Netns, events: subprocess.Popen) -> None:
    assert events.stdout is not None
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(events.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    probe = [sys.executable, "-c", "import socket; socket.socket(2, 2).sendto(b'x', ('127.0.0.1', 5399))"]

    def stream_is_live() -> bool:  # a miss on a probe port comes back: the stream counts from here
        subprocess.run(["ip", "netns", "exec", netns.name, *probe], check=True, timeout=60)
        time.sleep(0.5)
        return any('"local_port":5399' in line for line in list(lines))

    _until("the miss stream live", stream_is_live, 60)
    spec = {"udp_a": 25, "udp_b": 7, "udp6": 5, "tcp": 9, "closed_udp": 6, "closed_tcp": 4, "closed_tcp6": 3}
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", TRAFFIC, json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        cookies = json.loads(proc.stdout.readline())
        _check_counts(agent, netns, spec, cookies)
    finally:
        proc.communicate("\n", timeout=30)

    def streamed() -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for line in list(lines):
            e = json.loads(line)
            assert e["kind"] == "miss" and e["netns"] == netns.inode, e
            if e["local_port"] != 5399:
                out[(e["protocol"], e["local_port"])] = out.get((e["protocol"], e["local_port"]), 0) + e["misses"]
        return out

    # the stream tells misses once a second
    _until("the misses streamed", lambda: streamed() == {("udp", 5354): 6, ("tcp", 8081): 4, ("tcp", 8082): 3}, 30)


def _check_counts(agent: AgentProc, netns: Netns, spec: dict, cookies: dict) -> None:
    report = _report("lookups", agent, netns)
    got = {(d["protocol"], d["address"], d["port"]): d for d in report["destinations"]}
    expect = {
        ("udp", "127.0.0.1", 5353): (spec["udp_a"] + spec["udp_b"], 0, cookies["server"]),
        ("udp", "::1", 5353): (spec["udp6"], 0, cookies["server6"]),
        ("tcp", "127.0.0.1", 8080): (spec["tcp"], 0, cookies["listener"]),
        ("udp", "127.0.0.1", 5354): (spec["closed_udp"], spec["closed_udp"], None),
        ("tcp", "127.0.0.1", 8081): (spec["closed_tcp"], spec["closed_tcp"], None),
        ("tcp", "::1", 8082): (spec["closed_tcp6"], spec["closed_tcp6"], None),
    }
    for key, (lookups, misses, cookie) in expect.items():
        assert key in got, f"{key} not counted: {sorted(got)}"
        d = got[key]
        assert (d["lookups"], d["misses"]) == (lookups, misses), (key, d)
        assert [s["cookie"] for s in d["sockets"]] == ([cookie] if cookie else []), (key, d)
    closed = {(c["protocol"], c["port"]): c["misses"] for c in report["closed_ports"] if c["port"] != 5399}
    assert closed == {("udp", 5354): 6, ("tcp", 8081): 4, ("tcp", 8082): 3}
    assert report["totals"]["lookups_uncounted"] == 0

    peers = _report("peers", agent, netns)["peers"]
    to_server = {(p["remote_address"], p["remote_port"]): p for p in peers if p["local_port"] == 5353}
    assert {k: p["packets"] for k, p in to_server.items()} == {
        ("127.0.0.1", 40001): spec["udp_a"],
        ("127.0.0.1", 40002): spec["udp_b"],
        ("::1", 40003): spec["udp6"],
    }
    assert all(p["sockets"] and p["sockets"][0]["cookie"] in (cookies["server"], cookies["server6"])
               for p in to_server.values())  # fmt: skip
    assert all(abs(time.time() - p["last_seen"]) < 60 for p in to_server.values())

    text = _sw("snapshot", "--lookups", "--netns", str(netns.inode), "--socket", agent.socket)
    assert text.returncode == 0 and "127.0.0.1:5354" in text.stdout and "Ports probed" in text.stdout, text.stdout


def test_a_deleted_namespace_releases_its_hook(agent: AgentProc, netns_factory) -> None:
    ns = netns_factory()
    _until("the new namespace hooked", lambda: _ours(ns.inode))
    before = set(_ours(None))
    subprocess.run(["ip", "netns", "del", ns.name], check=True)
    _until("its link released", lambda: len(set(_ours(None)) & before) == len(before) - 1)
    st = agent.status()
    assert st["lookup"]["namespaces_hooked"] == st["namespaces"], st["lookup"]


# Many destinations and peers, interleaved on one CPU so that they keep taking each
# other's cache slots (256 a CPU): every count then goes through lookup_counts and
# udp_peers as well as the caches.
CHURN = r"""
import json, os, resource, socket, sys
os.sched_setaffinity(0, {0})
n = int(sys.argv[1])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, n + 64), max(hard, n + 64)))
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
server.bind(("127.0.0.1", 6000))
clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
for c in clients:
    c.bind(("127.0.0.1", 0))
for rnd in range(3):
    for i, c in enumerate(clients):
        if i % 3 >= rnd:  # client i sends 1 + i % 3 datagrams in all
            c.sendto(b"x", ("127.0.0.1", 6000))
        c.sendto(b"x", ("127.0.0.1", 20000 + i))  # closed: a miss each, 3 a port
        while True:
            try:
                server.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
print(json.dumps([c.getsockname()[1] for c in clients]), flush=True)
sys.stdin.readline()
"""


def _map_cookies(name: str) -> set[int]:
    """The namespace cookies of every key in one of the agent's maps, as bpftool sees it."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "name", name], capture_output=True, text=True, check=True)
    return {int.from_bytes(bytes(int(b, 16) for b in e["key"][:8]), "little") for e in json.loads(out.stdout)}


def test_counts_stay_exact_when_slots_change_hands(agent: AgentProc, netns_factory, netns: Netns) -> None:
    """600 peers of one server and 600 closed ports, interleaved: every count exact, the
    caches' and the maps' added. Then the namespace is deleted, and once other traffic
    has pushed its keys out of the caches no map holds any of them."""
    from sockwatch.kernel.netns import NamespaceRegistry

    n = 600
    ns = netns_factory()
    ns_cookie = NamespaceRegistry()._open(f"/run/netns/{ns.name}").cookie  # type: ignore[union-attr]
    _until("the new namespace hooked", lambda: _ours(ns.inode))
    r = _sw("snapshot", "--peers", "--json", "--top", "1", "--socket", agent.socket)
    assert r.returncode == 0, r.stderr
    evicted = json.loads(r.stdout)["totals"].get("udp_peers_evicted", 0)  # the session agent's, before this test
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", CHURN, str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        r = _sw("snapshot", "--lookups", "--json", "--top", "10000", "--netns", str(ns.inode), "--socket", agent.socket)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        got = {(d["protocol"], d["port"]): (d["lookups"], d["misses"]) for d in report["destinations"]}
        assert got.pop(("udp", 6000)) == (sum(1 + i % 3 for i in range(n)), 0)
        # each port unreachable comes back to its sender's socket through a lookup too
        # (__udp4_lib_err; loopback's ICMP errors are not rate-limited)
        assert got == {("udp", 20000 + i): (3, 3) for i in range(n)} | {("udp", p): (3, 0) for p in ports}
        assert report["totals"]["lookups_uncounted"] == 0
        r = _sw("snapshot", "--peers", "--json", "--top", "10000", "--netns", str(ns.inode), "--socket", agent.socket)
        assert r.returncode == 0, r.stderr
        peers = json.loads(r.stdout)
        by_port = {p["remote_port"]: p["packets"] for p in peers["peers"] if p["local_port"] == 6000}
        assert by_port == {port: 1 + i % 3 for i, port in enumerate(ports)}
        assert peers["totals"].get("udp_peers_evicted", 0) == evicted  # none evicted by this test's 1200
    finally:
        proc.communicate("\n", timeout=60)
    assert ns_cookie in _map_cookies("lookup_counts") | _map_cookies("udp_peers")  # written back: the case at hand

    before = set(_ours(None))
    subprocess.run(["ip", "netns", "del", ns.name], check=True)
    _until("its link released", lambda: len(set(_ours(None)) & before) == len(before) - 1)
    _until("the other namespace hooked", lambda: _ours(netns.inode))
    subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", CHURN.replace("sys.stdin.readline()", ""),
                    str(n)], check=True, capture_output=True, timeout=120)  # fmt: skip
    for _ in range(2):  # a key written back while one read runs is caught by the next
        assert _sw("snapshot", "--lookups", "--json", "--socket", agent.socket).returncode == 0
        assert _sw("snapshot", "--peers", "--json", "--socket", agent.socket).returncode == 0
    assert ns_cookie not in _map_cookies("lookup_counts") | _map_cookies("udp_peers")


def test_a_small_peer_map_counts_its_evictions(fresh_agent, netns: Netns, tmp_path) -> None:
    """3000 peers into --max-udp-peers 1024: peers are evicted, least recently seen
    first, and every one seen is either kept or counted as evicted; the view says so."""
    a = fresh_agent(str(tmp_path / "a.sock"), ("--max-udp-peers", "1024"))
    assert a.status()["lookup"]["udp_peers_capacity"] == 1024
    subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", CHURN.replace("sys.stdin.readline()", ""),
                    "3000"], check=True, capture_output=True, timeout=120)  # fmt: skip
    r = _sw("snapshot", "--peers", "--json", "--top", "10000", "--socket", a.socket)
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["totals"]
    assert t["udp_peers_seen"] >= 3000 and 0 < t["udp_peers_seen"] - t["udp_peers_evicted"] <= 1024, t
    text = _sw("snapshot", "--peers", "--socket", a.socket)
    assert f"{t['udp_peers_evicted']} peers were evicted" in text.stdout, text.stdout


def _hidden_namespace(flows: int) -> tuple[list[socket.socket], int]:
    """Sockets in a network namespace no agent can find, and a descriptor of it: a thread
    of the test's moves itself alone into a new namespace (a namespace is per thread;
    agents look at each process's main thread), opens them, and ends. Nothing else holds
    the namespace, and no process has it as its own.
    The sockets: a UDP reuseport group of 3 on 127.0.0.1:7000, a wildcard UDP socket on
    :7000, two reuseport TCP listeners on :7100, and 2*flows unbound UDP and TCP sockets."""
    import ctypes
    import fcntl
    import struct
    import threading

    got: list = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET, this thread only
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # lo up: SIOCSIFFLAGS
                fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 0x1 | 0x8 | 0x40))
            socks = []
            for addr, reuse in (("127.0.0.1", True),) * 3 + (("0.0.0.0", False),):
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the wildcard beside the group
                if reuse:
                    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                u.bind((addr, 7000))
                socks.append(u)
            for _ in range(2):
                t = socket.socket()
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                t.bind(("127.0.0.1", 7100))
                t.listen(256)
                socks.append(t)
            for _ in range(flows):
                socks += [socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket()]
            got.extend([socks, os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)])
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=inside)
    t.start()
    t.join(60)
    if got and isinstance(got[0], BaseException):
        raise got[0]
    return got[0], got[1]


def _deliveries(receivers: list[socket.socket], listeners: list[socket.socket], udp_senders: list[socket.socket],
                tcp_clients: list[socket.socket], base: int) -> dict[tuple[str, int, str], int]:  # fmt: skip
    """Send one datagram per sender to 127.0.0.1:7000 and 127.0.0.2:7000, and one
    connection per client to 7100; which receiver (index) got each flow."""
    got: dict[tuple[str, int, str], int] = {}
    for i, s in enumerate(udp_senders):
        s.bind(("127.0.0.1", base + i))
        for dst in ("127.0.0.1", "127.0.0.2"):
            s.sendto(dst.encode(), (dst, 7000))
    for r in receivers:
        r.setblocking(False)
    time.sleep(0.2)
    for idx, r in enumerate(receivers):
        while True:
            try:
                data, peer = r.recvfrom(64)
            except BlockingIOError:
                break
            got[("udp", peer[1], data.decode())] = idx
    linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
    for i, c in enumerate(tcp_clients):
        c.bind(("127.0.0.1", base + i))
        c.connect(("127.0.0.1", 7100))
    for idx, ls in enumerate(listeners):
        ls.setblocking(False)
        while True:
            try:
                a, peer = ls.accept()
            except BlockingIOError:
                break
            got[("tcp", peer[1], "")] = idx
            a.close()
    for c in tcp_clients:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        c.close()
    return got


def test_traffic_is_delivered_the_same_with_the_hook() -> None:
    """The same flows to a reuseport group, a wildcard socket and reuseport listeners
    reach the same sockets with sockwatch's program attached as without it, and the
    program counted every one of them."""
    from sockwatch.kernel import bpfload
    from sockwatch.kernel.links import Links
    from sockwatch.kernel.lookup import LookupHook

    flows = 40
    socks, nsfd = _hidden_namespace(flows)
    b = None
    link = -1
    try:
        receivers, listeners, rest = socks[:4], socks[4:6], socks[6:]
        udp_a, tcp_a = rest[0 : 2 * flows : 2][: flows // 2], rest[1 : 2 * flows : 2][: flows // 2]
        udp_b, tcp_b = rest[0 : 2 * flows : 2][flows // 2 :], rest[1 : 2 * flows : 2][flows // 2 :]
        without = _deliveries(receivers, listeners, udp_a, tcp_a, 30000)
        assert len(without) == 3 * (flows // 2), without
        assert not _ours(os.fstat(nsfd).st_ino), "no agent may find this namespace"

        b = bpfload.compile_programs(bpfload.Sizes(16, 1024, 1024), bpfload.drop_reasons())
        hook = LookupHook(b, Links())
        cookie = int.from_bytes(receivers[0].getsockopt(socket.SOL_SOCKET, 71, 8), "little")  # SO_NETNS_COOKIE
        link = hook.link(cookie, nsfd)
        for s in udp_a:  # the same source ports again (a UDP socket binds once)
            s.close()
        with_hook = _deliveries(receivers, listeners, udp_b, tcp_b, 30000)
        assert with_hook == without
        counted = {(c.protocol, str(c.address), c.port): c.lookups for c in hook.counts() if c.netns == cookie}
        assert counted == {(17, "127.0.0.1", 7000): flows // 2, (17, "127.0.0.2", 7000): flows // 2,
                           (6, "127.0.0.1", 7100): flows // 2}, counted  # fmt: skip
        assert len({v for k, v in with_hook.items() if k[0] == "udp" and k[2] == "127.0.0.1"}) > 1, (
            "the flows should spread over the reuseport group"
        )
    finally:
        if link >= 0:
            os.close(link)
        for s in socks:
            s.close()
        os.close(nsfd)  # the namespace goes with its last holder
        if b is not None:
            b.cleanup()


@pytest.mark.parametrize("flag", ["--lookups", "--peers"])
def test_lookups_need_an_agent(flag: str) -> None:
    r = _sw("snapshot", flag, "--standalone")
    assert r.returncode != 0 and "needs a running agent" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_lookups_off_leaves_the_hook_out(fresh_agent, tmp_path) -> None:
    from sockwatch.kernel import bpfload

    before = set(_ours(None))
    a = fresh_agent(str(tmp_path / "a.sock"), ("--lookups", "off"))
    st = a.status()
    assert st["lookup"] is None and st["hooks_missing"] == [] and st["links"] == bpfload.links_at_start() - 1
    # no sk_lookup link of its own (another agent's may go meanwhile, with a test's namespace)
    assert set(_ours(None)) <= before
    r = _sw("snapshot", "--lookups", "--socket", a.socket)
    assert r.returncode != 0 and "--lookups off" in r.stderr and "Traceback" not in r.stderr, r.stderr
