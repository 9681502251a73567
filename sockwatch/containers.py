"""Which container (and on a Kubernetes node, which pod) a process runs in, from its
cgroup path alone: no runtime socket and no API server is asked.

The rules (pure, table-tested) read the path shapes that runtimes and the kubelet make:

  Docker        /docker/<id>                        /system.slice/docker-<id>.scope
  containerd    /kubepods/burstable/pod<uid>/<id>   .../kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
  CRI-O         .../kubepods-pod<uid_>.slice/crio-<id>.scope  (crio-conmon-<id> is the monitor, not the container)
  podman        /machine.slice/libpod-<id>.scope    .../user@1000.service/user.slice/libpod-<id>.scope/container
  LXC           /lxc.payload.<name>                 /lxc/<name>
  nspawn        /machine.slice/machine-<name>.scope
  systemd       /system.slice/<unit>.service        (a service, not a container: named by its unit)

A reader in another cgroup namespace sees the path relative to its own root
("/../../kubepods/..."), so the shapes are searched for, not anchored. The pod's
namespace and name come from the kubelet's log directories: /var/log/pods/
<namespace>_<name>_<uid>/ and /var/log/containers/<pod>_<namespace>_<container>-<id>.log.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

_HEX64 = r"[0-9a-f]{64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# (runtime, pattern with group "id"), most specific first
_RUNTIMES: list[tuple[str, re.Pattern[str]]] = [
    ("containerd", re.compile(rf"/cri-containerd-(?P<id>{_HEX64})\.scope(?:/|$)")),
    ("cri-o", re.compile(rf"/crio-(?P<id>{_HEX64})\.scope(?:/|$)")),
    ("docker", re.compile(rf"/docker-(?P<id>{_HEX64})\.scope(?:/|$)")),
    ("docker", re.compile(rf"/docker/(?P<id>{_HEX64})(?:/|$)")),
    ("podman", re.compile(rf"/libpod-(?P<id>{_HEX64})\.scope(?:/|$)")),
    ("kubernetes", re.compile(rf"/pod{_UID}/(?P<id>{_HEX64})(?:/|$)")),  # cgroupfs driver: runtime unnamed
    ("lxc", re.compile(r"/lxc\.payload\.(?P<id>[^/]+)")),
    ("lxc", re.compile(r"^(?:/\.\.)*/lxc/(?P<id>[^/]+)")),
    ("nspawn", re.compile(r"/machine-(?P<id>[^/]+)\.scope(?:/|$)")),
]
_POD = re.compile(rf"/kubepods[^/]*(?:/[^/]+)*?/(?:[^/]*-)?pod(?P<uid>{_UID})(?:\.slice)?(?:/|$)")
_UNIT = re.compile(r"/(?P<unit>[^/]+\.service)(?:/|$)")
_CONMON = re.compile(r"/crio-conmon-")

MAX_CGROUP_BYTES = 64 * 1024  # /proc/PID/cgroup is a few hundred bytes; more is not what we expect
POD_DIRS_SECONDS = 5.0  # an unknown pod uid re-reads the kubelet's directories at most this often
PID_SECONDS = 10.0  # a process's cgroup is taken as read this long (moves between cgroups are rare)


@dataclass(frozen=True, slots=True)
class Container:
    """Where a process runs. `runtime` is "systemd" for a plain service (id is its unit)."""

    cgroup: str
    runtime: str | None = None
    id: str | None = None
    name: str | None = None  # the container's name, where the node says (Kubernetes)
    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None

    @property
    def short(self) -> str | None:
        """What a column shows: the container's name, else its id as `docker ps` prints it."""
        if self.name:
            return self.name
        if self.id and self.runtime != "systemd":
            return self.id[:12] if re.fullmatch(_HEX64, self.id) else self.id
        return None

    @property
    def label(self) -> str:
        """One cell: pod/container on Kubernetes, runtime:id for a container, the unit
        for a service, else nothing."""
        if self.pod_name:
            return f"{self.pod_namespace}/{self.pod_name}/{self.short or '?'}"
        if self.runtime == "systemd":
            return self.id or ""
        if self.runtime and self.short:
            return f"{self.runtime}:{self.short}"
        return ""

    @property
    def pod(self) -> str | None:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else None

    @classmethod
    def label_of(cls, d: object) -> str:
        """The label of a container as the agent's JSON carries it (not trusted): "" for
        none, "?" for something that is not a container."""
        if d is None:
            return ""
        try:
            return cls.from_dict(d).label
        except ValueError:
            return "?"

    @classmethod
    def from_dict(cls, d: object) -> Container:
        """The inverse of as_dict, for what came over the wire: strings or nulls only."""
        if not isinstance(d, dict) or not isinstance(d.get("cgroup"), str):
            raise ValueError("a container is an object with a cgroup path")
        fields = ("runtime", "id", "name", "pod_namespace", "pod_name", "pod_uid")
        if any(d.get(f) is not None and not isinstance(d.get(f), str) for f in fields):
            raise ValueError("a container's fields are strings")
        return cls(d["cgroup"], *(d.get(f) for f in fields))

    def as_dict(self) -> dict:
        return {
            "cgroup": self.cgroup,
            "runtime": self.runtime,
            "id": self.id,
            "name": self.name,
            "pod_namespace": self.pod_namespace,
            "pod_name": self.pod_name,
            "pod_uid": self.pod_uid,
        }


def is_container(c: Container | None) -> bool:
    """Whether a process's cgroup names a container, pod or service (a cgroup alone, a
    login session's, is not one: its JSON is null, as for no cgroup at all)."""
    return c is not None and bool(c.label)


def cgroup_path(text: str) -> str | None:
    """The path that says most about a process, from /proc/PID/cgroup: the first line
    with a container's shape, else the cgroup v2 path, else v1's name=systemd path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if any(p.search(path) for _, p in _RUNTIMES) or _POD.search(path):
            return path
        key = "v2" if hierarchy == "0" and not controllers else controllers
        paths.setdefault(key, path)
    for key in ("v2", "name=systemd"):
        if paths.get(key, "/") != "/":
            return paths[key]
    return paths.get("v2") or paths.get("name=systemd") or next(iter(paths.values()), None)


def parse(path: str) -> Container:
    """The container id, runtime and pod uid a cgroup path names (pure)."""
    pod = _POD.search(path)
    pod_uid = pod.group("uid").replace("_", "-") if pod else None
    if not _CONMON.search(path):
        for runtime, pattern in _RUNTIMES:
            m = pattern.search(path)
            if m:
                return Container(path, runtime, m.group("id"), pod_uid=pod_uid)
    if pod_uid:
        return Container(path, "kubernetes", None, pod_uid=pod_uid)  # the pod's sandbox or conmon
    unit = _UNIT.search(path)
    if unit:
        return Container(path, "systemd", unit.group("unit"))
    return Container(path)


def pod_dir_name(name: str) -> tuple[str, str, str] | None:
    """/var/log/pods/<namespace>_<name>_<uid>: (namespace, name, uid). Namespaces and
    pod names are DNS labels and subdomains (no "_"), so the split is exact."""
    parts = name.split("_")
    if len(parts) != 3 or not re.fullmatch(_UID.replace("[-_]", "-"), parts[2]):
        return None
    if not all(re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", p) for p in parts[:2]):
        return None
    return parts[0], parts[1], parts[2]


def container_log_name(name: str) -> tuple[str, str, str, str] | None:
    """/var/log/containers/<pod>_<namespace>_<container>-<id>.log: (pod, namespace,
    container, id)."""
    m = re.fullmatch(rf"([a-z0-9][-a-z0-9.]*)_([a-z0-9][-a-z0-9]*)_([a-z0-9][-a-z0-9]*)-({_HEX64})\.log", name)
    return (m.group(1), m.group(2), m.group(3), m.group(4)) if m else None


class Resolver:
    """Container and pod of a process, cached per pid. `proc`, `pods_dir` and
    `containers_dir` are the host's /proc and the kubelet's log directories (a
    DaemonSet mounts them; tests point them at directories of their own)."""

    def __init__(
        self, proc: str = "/proc", pods_dir: str = "/var/log/pods", containers_dir: str = "/var/log/containers"
    ) -> None:
        self.proc, self.pods_dir, self.containers_dir = proc, pods_dir, containers_dir
        self._by_pid: dict[int, tuple[float, Container | None]] = {}
        self._pods: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._names: dict[str, str] = {}  # container id -> container name
        self._pods_read = -POD_DIRS_SECONDS

    def of_pid(self, pid: int, now: float | None = None) -> Container | None:
        now = time.monotonic() if now is None else now
        hit = self._by_pid.get(pid)
        if hit is not None and now - hit[0] < PID_SECONDS:
            return hit[1]
        c = self._read(pid, now)
        if len(self._by_pid) > 65536:  # pids come and go: forget the stale ones
            self._by_pid = {p: v for p, v in self._by_pid.items() if now - v[0] < PID_SECONDS}
        self._by_pid[pid] = (now, c)
        return c

    def _read(self, pid: int, now: float) -> Container | None:
        try:
            with open(f"{self.proc}/{pid}/cgroup", "rb") as f:
                raw = f.read(MAX_CGROUP_BYTES)
        except OSError:
            return None
        path = cgroup_path(raw.decode(errors="replace"))
        if path is None:
            return None
        c = parse(path)
        if c.pod_uid is None:
            return c
        if (c.pod_uid not in self._pods or (c.id and c.id not in self._names)) and (
            now - self._pods_read >= POD_DIRS_SECONDS
        ):
            self._read_kubelet_dirs()
            self._pods_read = now
        ns_name = self._pods.get(c.pod_uid)
        return Container(
            c.cgroup, c.runtime, c.id, self._names.get(c.id or ""), ns_name[0] if ns_name else None,
            ns_name[1] if ns_name else None, c.pod_uid,
        )  # fmt: skip

    def _read_kubelet_dirs(self) -> None:
        pods, names = {}, {}
        for entry in _listdir(self.pods_dir):
            p = pod_dir_name(entry)
            if p is not None:
                pods[p[2]] = (p[0], p[1])
        for entry in _listdir(self.containers_dir):
            c = container_log_name(entry)
            if c is not None:
                names[c[3]] = c[2]
        self._pods, self._names = pods, names


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)[:100_000]
    except OSError:
        return []
