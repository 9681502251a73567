"""The namespace registry against the kernel's own namespaces: inodes are reused at once,
so an inode is not an identity (the cookie is)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from sockwatch.kernel.netns import NamespaceRegistry


def _add() -> tuple[str, int]:
    name = f"sw-t-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name, os.stat(f"/run/netns/{name}").st_ino


def _delete(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_new_namespace_on_a_dead_ones_inode_is_found_without_a_process():
    """An event that names no process (sockops on kernels before 6.2) is placed only by
    the registry's search: it must find a namespace that took a dead one's inode, not
    take the inode for known and drop the event (the 6.1 guest lost listeners so)."""
    made: list[str] = []
    try:
        first, inode = _add()
        made.append(first)
        reg = NamespaceRegistry()
        reg.refresh()
        dead = reg.by_inode[inode]
        _delete(first)
        # the kernel frees a namespace's inode when its clean-up work has run
        deadline = time.monotonic() + 20
        while True:
            name, got = _add()
            made.append(name)
            if got == inode:
                break
            _delete(name)
            assert time.monotonic() < deadline, f"the kernel did not reuse inode {inode} within 20 s"
            time.sleep(0.2)
        fresh = NamespaceRegistry()._open(f"/run/netns/{name}")
        assert fresh is not None and fresh.cookie != dead.cookie
        found = reg.resolve_cookie(fresh.cookie, None)
        assert found is not None and (found.inode, found.cookie) == (inode, fresh.cookie)
        # the dead one is reported gone, so that its rows go with it
        assert [ns.cookie for ns in reg.check_alive()] == [dead.cookie]
        assert reg.by_inode[inode].cookie == fresh.cookie
    finally:
        for name in made:
            _delete(name)
