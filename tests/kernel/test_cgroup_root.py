"""`serve --cgroup-root`: the hooks attach to the cgroup v2 mount named, not the first
one (a container in its own cgroup namespace sees only its own cgroup at /sys/fs/cgroup).
Proven by naming a sub-cgroup: only the process inside it is announced by the hooks."""

from __future__ import annotations

import os
import uuid

from tests.kernel.conftest import AgentProc, snapshot
from tests.kernel.test_containers import cgroup


def test_hooks_attach_to_the_named_cgroup_mount(tmp_path, netns, child_factory):
    inside, outside = child_factory(netns.name), child_factory(netns.name)
    with cgroup(f"sw-test-{uuid.uuid4().hex[:8]}") as cg:
        try:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(inside.pid))
            where = tmp_path / "cg"
            where.mkdir()
            # the agent alone sees the sub-cgroup mounted there (its own mount namespace)
            prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                      'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", cg, str(where))  # fmt: skip
            a = AgentProc(socket=str(tmp_path / "a.sock"), extra=("--cgroup-root", str(where)), prefix=prefix)
            try:
                inside.do(op="tcp_listen", addr="0.0.0.0", port=47330)
                outside.do(op="tcp_listen", addr="0.0.0.0", port=47331)
                rows = {r["local_port"]: r for r in snapshot("--netns", str(netns.inode), socket=a.socket)}
                # both are in the kernel's table, which a view reads; only the one inside was seen by a hook
                # (its owner is the hook's), the other's owner is read from /proc
                assert {47330, 47331} <= set(rows), rows
                assert rows[47330]["owner_source"] == "hook" and rows[47331]["owner_source"] == "proc", rows
            finally:
                a.stop()
        finally:
            inside.stop()
            outside.stop()


def test_a_cgroup_root_that_is_not_a_cgroup2_mount_is_refused(tmp_path):
    a = None
    try:
        a = AgentProc(socket=str(tmp_path / "a.sock"), extra=("--cgroup-root", str(tmp_path)))
    except RuntimeError as e:
        assert "is not a cgroup v2 mount" in str(e), e
    else:
        a.stop()
        raise AssertionError("the agent started on a directory that is no cgroup2 mount")
