"""Container and pod names from cgroup paths (one table of the shapes runtimes and the
kubelet make) and from a node's directories, built here as a real node has them."""

from __future__ import annotations

import os

import pytest

from sockwatch import containers as C

ID = "3f2a9c" + "0" * 52 + "abcdef"
ID2 = "b" * 64
UID = "5b1c2d3e-aaaa-4bbb-8ccc-123456789abc"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("path", "runtime", "cid", "pod_uid"),
    [
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope",
         "containerd", ID, UID),
        (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope", "cri-o", ID, UID),  # Guaranteed QoS
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope",
         "kubernetes", None, UID),  # conmon watches the container; it is not it
        (f"/kubepods/burstable/pod{UID}/{ID}", "kubernetes", ID, UID),  # cgroupfs driver
        (f"/kubepods/pod{UID}/{ID}", "kubernetes", ID, UID),
        (f"/../../kubepods/besteffort/pod{UID}/{ID}", "kubernetes", ID, UID),  # seen from another cgroup namespace
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", "kubernetes", None, UID),
        (f"/docker/{ID}", "docker", ID, None),
        (f"/system.slice/docker-{ID}.scope", "docker", ID, None),
        (f"/machine.slice/libpod-{ID}.scope", "podman", ID, None),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container", "podman", ID, None),
        ("/lxc.payload.web1", "lxc", "web1", None),
        ("/lxc/web1/init.scope", "lxc", "web1", None),
        ("/machine.slice/machine-build1.scope/payload", "nspawn", "build1", None),
        ("/system.slice/nginx.service", "systemd", "nginx.service", None),
        ("/system.slice/containerd.service", "systemd", "containerd.service", None),  # the runtime itself
        ("/user.slice/user-1000.slice/session-3.scope", None, None, None),
        ("/", None, None, None),
        (f"/docker/{ID[:63]}", None, None, None),  # not an id: no container
        (f"/system.slice/docker-{ID}.scope.bak/x", None, None, None),
    ],
)  # fmt: skip
def test_cgroup_path_shapes(path, runtime, cid, pod_uid):
    c = C.parse(path)
    assert (c.runtime, c.id, c.pod_uid, c.cgroup) == (runtime, cid, pod_uid, path)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("0::/system.slice/nginx.service\n", "/system.slice/nginx.service"),
        # hybrid (v1 + unified): the container line wins wherever it is
        (f"12:pids:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n", f"/docker/{ID}"),
        ("9:name=systemd:/system.slice/ssh.service\n4:memory:/x\n0::/\n", "/system.slice/ssh.service"),
        ("0::/\n", "/"),
        ("garbage\n\n1:cpu\n", None),
        ("", None),
    ],
)
def test_which_line_of_proc_pid_cgroup(text, path):
    assert C.cgroup_path(text) == path


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (f"default_web-0_{UID}", ("default", "web-0", UID)),
        (f"kube-system_coredns-5d78c9869d-abcde_{UID}", ("kube-system", "coredns-5d78c9869d-abcde", UID)),
        (f"default_web_0_{UID}", None),
        (f"default_web-0_{UID_}", None),
        ("default_web-0", None),
        (f"Default_web-0_{UID}", None),
    ],
)
def test_pod_log_dir_names(name, want):
    assert C.pod_dir_name(name) == want


def test_container_log_names():
    assert C.container_log_name(f"web-0_default_nginx-{ID}.log") == ("web-0", "default", "nginx", ID)
    assert C.container_log_name(f"web-0_default_nginx-{ID[:10]}.log") is None
    assert C.container_log_name("../../etc/passwd") is None


def node(tmp_path, procs: dict[int, str]):
    """A node's /proc/PID/cgroup files and kubelet log directories, in tmp_path."""
    for pid, text in procs.items():
        os.makedirs(tmp_path / "proc" / str(pid))
        (tmp_path / "proc" / str(pid) / "cgroup").write_text(text)
    os.makedirs(tmp_path / "pods" / f"shop_cart-7d9f_{UID}" / "app")
    os.makedirs(tmp_path / "pods" / "not-a-pod")
    os.makedirs(tmp_path / "containers")
    (tmp_path / "containers" / f"cart-7d9f_shop_app-{ID}.log").symlink_to(tmp_path / "pods" / "nowhere")
    return C.Resolver(str(tmp_path / "proc"), str(tmp_path / "pods"), str(tmp_path / "containers"))


def test_resolver_names_pod_and_container_from_the_node(tmp_path):
    sys_path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
    r = node(tmp_path, {10: f"0::{sys_path}\n", 11: f"0::/docker/{ID2}\n", 12: "0::/system.slice/cron.service\n"})
    c = r.of_pid(10, now=100.0)
    assert c is not None
    assert (c.runtime, c.id, c.name, c.pod, c.pod_uid) == ("containerd", ID, "app", "shop/cart-7d9f", UID)
    assert c.short == "app"
    d = r.of_pid(11, now=100.0)
    assert d is not None and (d.runtime, d.short, d.pod) == ("docker", ID2[:12], None)
    e = r.of_pid(12, now=100.0)
    assert e is not None and (e.runtime, e.id, e.short) == ("systemd", "cron.service", None)
    assert r.of_pid(13, now=100.0) is None  # no such process


def test_resolver_caches_per_pid_and_finds_a_new_pod_later(tmp_path):
    path = f"/kubepods/besteffort/pod{UID}/{ID}"
    r = node(tmp_path, {10: f"0::{path}\n"})
    os.rename(tmp_path / "pods" / f"shop_cart-7d9f_{UID}", tmp_path / "pods" / "gone")
    c = r.of_pid(10, now=100.0)
    assert c is not None and c.pod is None and c.pod_uid == UID  # the kubelet has not written it yet
    os.rename(tmp_path / "pods" / "gone", tmp_path / "pods" / f"shop_cart-7d9f_{UID}")
    assert r.of_pid(10, now=101.0) is c  # cached
    c2 = r.of_pid(10, now=100.0 + C.PID_SECONDS + 0.1)
    assert c2 is not None and c2.pod == "shop/cart-7d9f"


def test_resolver_reads_no_more_than_a_cgroup_file_holds(tmp_path):
    r = node(tmp_path, {10: "0::/" + "a" * (C.MAX_CGROUP_BYTES * 2) + "\n"})
    c = r.of_pid(10, now=1.0)
    assert c is not None and len(c.cgroup) < C.MAX_CGROUP_BYTES
