"""Container and pod names for real processes: the test builds the cgroup and kubelet
directory shapes a Kubernetes node (systemd driver, containerd) and a Docker host have,
moves its socket-holding processes into those cgroups, and reads the names back from
snapshot, the event stream and /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import sockwatch_cmd
from tests.kernel.conftest import AgentProc, snapshot, subscribers, wait_subscribed


def cgroup2_root() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, where, kind, *_ = line.split()
            if kind == "cgroup2":
                return where
    pytest.fail("no cgroup v2 hierarchy is mounted (sockwatch's hooks need one)")


@contextlib.contextmanager
def cgroup(path: str) -> Iterator[str]:
    """A cgroup at `path` under the v2 root; removes the directories it made (only those)."""
    root = cgroup2_root()
    made: list[str] = []
    cur = root
    for part in path.strip("/").split("/"):
        cur = os.path.join(cur, part)
        if not os.path.isdir(cur):
            os.mkdir(cur)
            made.append(cur)
    try:
        yield cur
    finally:
        for d in reversed(made):
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.rmdir(d)
                    break
                except OSError:  # its processes are still being reaped
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def test_pods_and_containers_are_named_on_every_view(tmp_path, netns, child_factory):
    uid = str(uuid.uuid4())
    cid, docker_id = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    pod_slice = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    pod_path = f"kubepods.slice/kubepods-burstable.slice/{pod_slice}/cri-containerd-{cid}.scope"
    logs = tmp_path / "log"
    (logs / "pods" / f"shop_cart-7d9f_{uid}" / "app").mkdir(parents=True)
    (logs / "containers").mkdir()
    (logs / "containers" / f"cart-7d9f_shop_app-{cid}.log").symlink_to(logs / "pods" / f"shop_cart-7d9f_{uid}")
    app, web = child_factory(netns.name), child_factory(netns.name)
    agent = AgentProc(socket=str(tmp_path / "a.sock"), extra=("--kubelet-log-dir", str(logs)))
    events = None
    try:
        with cgroup(pod_path) as pod_cg, cgroup(f"docker/{docker_id}") as docker_cg:
            try:
                for pid, cg in ((app.pid, pod_cg), (web.pid, docker_cg)):
                    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                        f.write(str(pid))
                before = subscribers(agent.socket)
                events = subprocess.Popen(
                    sockwatch_cmd("events", "--json", "--socket", agent.socket, "--port", "47311"),
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                wait_subscribed(agent.socket, events, before)  # before the socket opens
                app.do(op="tcp_listen", addr="0.0.0.0", port=47310)
                web.do(op="udp_bind", addr="127.0.0.1", port=47311)

                rows = {r["local_port"]: r for r in snapshot("--netns", str(netns.inode), socket=agent.socket)}
                pod = rows[47310]["container"]
                assert pod["cgroup"] == "/" + pod_path
                got = tuple(pod[k] for k in ("runtime", "id", "name", "pod_namespace", "pod_name", "pod_uid"))
                assert got == ("containerd", cid, "app", "shop", "cart-7d9f", uid)
                dock = rows[47311]["container"]
                assert (dock["runtime"], dock["id"], dock["pod_name"]) == ("docker", docker_id, None)

                wide = sockwatch_cmd("snapshot", "-e", "--socket", agent.socket, "--netns", str(netns.inode))
                r = subprocess.run(wide, capture_output=True, text=True, check=True)  # (-e: the CONTAINER column)
                assert "shop/cart-7d9f/app" in r.stdout and f"docker:{docker_id[:12]}" in r.stdout, r.stdout

                body = urllib.request.urlopen(agent.status()["metrics"], timeout=10).read().decode()
                info = [line for line in body.splitlines() if line.startswith("sockwatch_listener_info{")
                        and 'port="47310"' in line]  # fmt: skip
                assert len(info) == 1 and 'container="app"' in info[0] and 'pod="shop/cart-7d9f"' in info[0], info

                assert events.stdout is not None
                deadline = time.monotonic() + 20
                while True:
                    line = events.stdout.readline()
                    assert line and time.monotonic() < deadline, "no bind event for 47311"
                    e = json.loads(line)
                    if e["kind"] == "bind" and e["local_port"] == 47311:
                        break
                assert e["container"]["id"] == docker_id and e["pid"] == web.pid
            finally:
                app.stop()  # out of the cgroups before they are removed
                web.stop()
    finally:
        if events is not None:
            events.terminate()
            events.wait(10)
        agent.stop()
