"""`sockwatch explain` against real packets: random sets of real sockets (TCP and UDP,
v4 and v6, wildcard and specific, v6only on and off, SO_REUSEPORT, connected UDP, bound
to lo, to another device or to none) in a fresh namespace, a real packet sent to each
(over lo: explain is told so with --dev lo), and the socket that really received it
must be the one explain named (for a reuseport group or a tie: one of those named)."""

from __future__ import annotations

import json
import os
import subprocess

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import Child

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 7070
# addresses the namespace has (lo: 127.0.0.0/8 and ::1)
V4 = ["0.0.0.0", "127.0.0.1", "127.0.0.2"]
V6 = ["::", "::1", "::ffff:127.0.0.1", "::ffff:127.0.0.2"]
PEER = ("127.0.0.3", 5555)  # where connected UDP sockets are connected to; packets come from here or elsewhere

sock_spec = st.fixed_dictionaries({
    "proto": st.sampled_from(["tcp", "udp"]),
    "family": st.sampled_from([4, 6]),
    "reuseport": st.booleans(),
    "v6only": st.booleans(),
    "connected": st.booleans(),
    "addr_i": st.integers(0, 3),
    "dev": st.sampled_from(["", "", "lo", "d0"]),  # SO_BINDTODEVICE: none, lo (where the packets arrive), a veth
})  # fmt: skip


def concrete(spec: dict) -> dict:
    addrs = V4 if spec["family"] == 4 else V6
    out = {"proto": spec["proto"], "family": spec["family"], "addr": addrs[spec["addr_i"] % len(addrs)],
           "port": PORT, "reuseport": spec["reuseport"], "v6only": spec["v6only"],
           "dev": spec.get("dev", "")}  # fmt: skip
    if spec["proto"] == "udp" and spec["connected"] and not (spec["family"] == 6 and spec["v6only"]):
        out["peer"] = [PEER[0] if spec["family"] == 4 else "::ffff:" + PEER[0], PEER[1]]
    return out


def explain(ns: str, proto: str, dst: str, src: tuple[str, int]) -> dict:
    d = f"[{dst}]:{PORT}" if ":" in dst else f"{dst}:{PORT}"
    s = f"[{src[0]}]:{src[1]}" if ":" in src[0] else f"{src[0]}:{src[1]}"
    r = subprocess.run(sockwatch_cmd("explain", proto, d, "--from", s, "--netns", ns, "--dev", "lo", "--json"),
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(sock_spec, min_size=1, max_size=6),
       packets=st.lists(st.tuples(st.sampled_from(["tcp", "udp"]),
                                  st.sampled_from(["127.0.0.1", "127.0.0.2", "::1"]),
                                  st.booleans()), min_size=1, max_size=4))  # fmt: skip
@example(  # AF_INET beats a dual-stack socket on the same wildcard (compute_score's +1)
    specs=[
        {"proto": p, "family": f, "reuseport": True, "v6only": False, "connected": False, "addr_i": 0}
        for p in ("tcp", "udp")
        for f in (6, 4)
    ],
    packets=[("tcp", "127.0.0.1", False), ("udp", "127.0.0.1", False)],
)
@example(  # a reuseport group, and the exact address over it
    specs=[
        {"proto": "udp", "family": 4, "reuseport": True, "v6only": False, "connected": False, "addr_i": i}
        for i in (0, 0, 1)
    ],
    packets=[("udp", "127.0.0.2", False), ("udp", "127.0.0.1", False)],
)
@example(  # a connected UDP socket takes its peer's datagrams, no other
    specs=[{"proto": "udp", "family": 4, "reuseport": True, "v6only": False, "connected": c, "addr_i": 1}
           for c in (False, True)],
    packets=[("udp", "127.0.0.1", True), ("udp", "127.0.0.1", False)],
)  # fmt: skip
@example(  # two connected UDP sockets (v4, and dual-stack v6) on one 4-tuple: Linux 6.13+ takes the last
    specs=[{"proto": "udp", "family": f, "reuseport": True, "v6only": False, "connected": True, "addr_i": 0}
           for f in (4, 6)],
    packets=[("udp", "127.0.0.1", True)],
)  # fmt: skip
def test_explain_names_the_socket_that_really_receives(netns_factory, specs, packets):
    ns = netns_factory()
    subprocess.run(["ip", "-n", ns.name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
    child = Child(ns.name, script="demux_child.py")
    try:
        opened = child.attempt(op="open", socks=[concrete(s) for s in specs])
        assert isinstance(opened, list)
        for proto, dst, from_peer in packets:
            src = PEER if from_peer and dst != "::1" else ((dst, 6000) if dst != "::1" else ("::1", 6000))
            said = explain(ns.name, proto, dst, src)
            got = child.attempt(op="send", proto=proto, dst=dst, dport=PORT, src=src[0], sport=src[1])
            assert isinstance(got, dict)
            named = {s["cookie"] for s in said["sockets"]}
            received = set(got["got"])
            why = f"\nsockets: {specs}\nopened: {opened}\npacket: {proto} {src} -> {dst}\nsaid: {said}\ngot: {got}"
            if not named:
                assert not received, why
                assert got["errno"] in (0, 111), why  # TCP: connection refused (the RST)
                continue
            assert len(received) == 1 and received <= named, why
            if len(named) > 1 and said["reason"] != "connected":
                # "one of" must be earned: a reuseport group spreads flows over its members
                # (16 flows all on one of 2 members: 2^-15); a tie (SO_REUSEADDR) gives all to one
                for i in range(1, 16):
                    more = child.attempt(op="send", proto=proto, dst=dst, dport=PORT, src=src[0], sport=src[1] + i)
                    assert isinstance(more, dict)
                    received |= set(more["got"])
                assert received <= named, why + f"\nover 16 flows: {received}"
                # a group spreads flows; a tie (groups, or SO_REUSEADDR) gives every flow to the first in the chain
                assert (len(received) > 1) == said["reuseport"], why + f"\nover 16 flows: {received}"
    finally:
        child.stop()


def test_another_sk_lookup_program_in_the_namespace_is_named(netns_factory):
    """A BPF sk_lookup program attached to the namespace (here a pass-through one, on the
    test's own namespace only) may steer packets: explain says so, and which program."""
    from bcc import BPF

    from sockwatch.kernel import bpfload

    ns = netns_factory()
    b = BPF(text="int steer(struct bpf_sk_lookup *ctx) { return SK_PASS; }")
    link = -1
    try:
        fn = b.load_func("steer", 30, attach_type=36)  # BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP
        nsfd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            link = bpfload.link_create(fn.fd, nsfd, 36)  # BPF_SK_LOOKUP
        finally:
            os.close(nsfd)
        said = explain(ns.name, "tcp", "127.0.0.1", ("127.0.0.1", 6000))
        assert len(said["sk_lookup_programs"]) == 1
        assert any("sk_lookup program" in step for step in said["steps"]), said["steps"]
    finally:
        if link >= 0:
            os.close(link)  # the link goes with its last descriptor
        b.cleanup()
    assert explain(ns.name, "tcp", "127.0.0.1", ("127.0.0.1", 6000))["sk_lookup_programs"] == []


# Three listeners on 0.0.0.0:9101 in one namespace, each bound (SO_BINDTODEVICE) to its
# own device, no SO_REUSEADDR; one more on [fe80::1]:9103 bound to vA0. Prints its
# listeners' cookies, then which one accepted each connection.
DEVICE_SERVER = """
import socket, select, sys
out = {}
for dev, fam, addr, port in (("vA0", 4, "0.0.0.0", 9101), ("lo", 4, "0.0.0.0", 9101), ("vB0", 4, "0.0.0.0", 9101),
                             ("vA0", 6, "fe80::1", 9103)):
    s = socket.socket(socket.AF_INET6 if fam == 6 else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.bind((addr, port, 0, socket.if_nametoindex(dev)) if fam == 6 else (addr, port))
    s.listen(8)
    s.setblocking(False)
    out[s] = f"{dev}/{port}"
print("up", flush=True)
while True:
    r, _, _ = select.select(list(out) + [sys.stdin], [], [])
    if sys.stdin in r:
        break
    for s in r:
        c, _ = s.accept()
        print(out[s], flush=True)
        c.close()
"""


def test_explain_answers_per_device_and_real_syns_agree(netns_factory):
    """The probe's case: explain used to call these an SO_REUSEADDR tie and answer RST for
    the link-local listener. Now it answers per device, and a real SYN arriving on each
    device is accepted by the listener explain names for that device."""
    srv, peer_a, peer_b = netns_factory(), netns_factory(), netns_factory()

    def ip(ns: str, *a: str) -> None:
        subprocess.run(["ip", "-n", ns, *a], check=True)

    for name, peer, net in (("vA", peer_a, "10.77.0"), ("vB", peer_b, "10.78.0")):
        subprocess.run(["ip", "link", "add", f"{name}0", "netns", srv.name, "type", "veth", "peer", "name",
                        f"{name}1", "netns", peer.name], check=True)  # fmt: skip
        ip(srv.name, "addr", "add", f"{net}.1/24", "dev", f"{name}0")
        ip(peer.name, "addr", "add", f"{net}.2/24", "dev", f"{name}1")
        for ns, dev in ((srv.name, f"{name}0"), (peer.name, f"{name}1")):
            ip(ns, "link", "set", dev, "up")
    ip(srv.name, "-6", "addr", "add", "fe80::1/64", "dev", "vA0", "nodad")
    ip(peer_a.name, "-6", "addr", "add", "fe80::2/64", "dev", "vA1", "nodad")
    server = subprocess.Popen(["ip", "netns", "exec", srv.name, "python3", "-c", DEVICE_SERVER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        r = subprocess.run(sockwatch_cmd("explain", "tcp", "10.77.0.1:9101", "--netns", srv.name, "--json"),
                           capture_output=True, text=True, check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["reason"] == "by-device", got["steps"]
        by = {c["device"]: c for c in got["by_device"]}
        devices = {s["cookie"]: s["device"] for s in got["sockets"]}
        assert {d: [devices[k] for k in c["sockets"]] for d, c in by.items()} == {
            "vA0": ["vA0"],
            "lo": ["lo"],
            "vB0": ["vB0"],
            "other": [],
        }
        assert by["other"]["answer"] == "RST" and not any("SO_REUSEADDR" in s for s in got["steps"])
        # real SYNs: from peer A (arriving on vA0), from peer B (on vB0), from inside (on lo)
        for ns, dst, expect in ((peer_a.name, "10.77.0.1", "vA0/9101"), (peer_b.name, "10.78.0.1", "vB0/9101"),
                                (srv.name, "127.0.0.1", "lo/9101")):  # fmt: skip
            subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                            f"import socket; socket.create_connection(('{dst}', 9101), timeout=5).close()"],
                           check=True)  # fmt: skip
            assert server.stdout.readline().strip() == expect, dst
        # the link-local listener: explain with the device names it; a SYN from peer A reaches it
        r = subprocess.run(sockwatch_cmd("explain", "tcp", "[fe80::1]:9103", "--dev", "vA0", "--netns", srv.name,
                                         "--json"), capture_output=True, text=True, check=False)  # fmt: skip
        got = json.loads(r.stdout)
        assert got["reason"] == "listener" and [s["device"] for s in got["sockets"]] == ["vA0"], got
        subprocess.run(["ip", "netns", "exec", peer_a.name, "python3", "-c",
                        "import socket; socket.create_connection(('fe80::1%vA1', 9103), timeout=5).close()"],
                       check=True)  # fmt: skip
        assert server.stdout.readline().strip() == "vA0/9103"
        # without --dev: that listener on vA0, nothing elsewhere (was: RST)
        r = subprocess.run(sockwatch_cmd("explain", "tcp", "[fe80::1]:9103", "--netns", srv.name, "--json"),
                           capture_output=True, text=True, check=False)  # fmt: skip
        got = json.loads(r.stdout)
        assert got["reason"] == "by-device" and {c["device"]: c["answer"] for c in got["by_device"]} == {
            "vA0": None,
            "other": "RST",
        }, got
        r = subprocess.run(sockwatch_cmd("explain", "tcp", "10.77.0.1:9101", "--dev", "nosuch0", "--netns", srv.name),
                           capture_output=True, text=True, check=False)  # fmt: skip
        assert r.returncode == 2 and "--dev 'nosuch0': no such device" in r.stderr, r.stderr
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(10)
