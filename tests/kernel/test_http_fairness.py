"""A local user holding connections to the metrics port takes nothing from root: the
UNIX socket has its own clients, and the metrics port answers /healthz and a scrape
within a second however many idle connections an unprivileged user keeps open."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.parse
import urllib.request

from tests.conftest import sockwatch_cmd

# As nobody (the system's python3: nobody may not be able to read this checkout's
# environment): open connections and send nothing, reopening any the agent drops, for as
# long as stdin stays open. Prints how many it holds once it has them.
SLOWLORIS = """
import socket, sys, select, time
host, port, n, sources = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
held = []
def one(i):
    s = socket.socket()
    s.bind((f"127.0.0.{2 + i % sources}", 0))  # loopback has 16 M source addresses
    s.settimeout(2)
    s.connect((host, port))
    s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n")  # a head never finished
    return s
for i in range(n):
    held.append(one(i))
print(len(held), flush=True)
i = n
while not select.select([sys.stdin], [], [], 0.05)[0]:
    for k, s in enumerate(held):
        r = select.select([s], [], [], 0)[0]
        if r:  # dropped (or answered): open another in its place at once
            s.close()
            try:
                held[k] = one(i)
            except OSError:
                pass
            i += 1
print(i - n, flush=True)
"""


def get(url: str, timeout: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read(), time.monotonic() - t0


def test_a_slowloris_of_nobody_starves_neither_root_nor_the_probes(agent):
    url = agent.status()["metrics"]
    host, port = urllib.parse.urlparse(url).netloc.rsplit(":", 1)
    base = url.removesuffix("/metrics")
    loris = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-c", SLOWLORIS, host, port, "200", "50"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert loris.stdout is not None and int(loris.stdout.readline()) == 200
        slowest = {"healthz": 0.0, "metrics": 0.0, "status": 0.0}
        end = time.monotonic() + 12  # past the agent's 5 s deadline for a request head, twice
        while time.monotonic() < end:
            body, took = get(base + "/healthz", timeout=5)
            assert body == b"ok\n"
            slowest["healthz"] = max(slowest["healthz"], took)
            body, took = get(url, timeout=5)
            assert b"sockwatch_build_info" in body
            slowest["metrics"] = max(slowest["metrics"], took)
            t0 = time.monotonic()
            r = subprocess.run(sockwatch_cmd("status", "--json", "--socket", agent.socket),
                               capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
            assert r.returncode == 0, r.stderr
            slowest["status"] = max(slowest["status"], time.monotonic() - t0)
            time.sleep(0.3)
        print("slowest answers under the slowloris:", {k: round(v, 3) for k, v in slowest.items()})
        assert slowest["healthz"] < 1 and slowest["metrics"] < 1, slowest
        assert slowest["status"] < 5, slowest  # (a whole CLI start-up)
    finally:
        if loris.stdin:
            loris.stdin.close()
        loris.wait(20)
    dropped = agent.status()["clients_dropped"]
    assert dropped.get("evicted", 0) > 0 or dropped.get("too_many_from_source", 0) > 0, dropped
    # nothing of the slowloris is left
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
