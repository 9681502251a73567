"""The agent's memory: bcc's compiler state is freed once everything is loaded, and what
the agent makes afterwards (a stream's hooks, a new namespace's sk_lookup copy) still
loads; nothing of it is left open after close()."""

from __future__ import annotations

import os

import pytest

from sockwatch.kernel import bpfload, prereq
from sockwatch.kernel.netns import NamespaceRegistry
from tests.kernel.conftest import AgentProc, Netns


def bpf_map_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-map"
        except OSError:
            pass
    return n


def test_the_module_is_released_and_everything_after_still_loads(netns: Netns):
    prereq.require()
    before = bpf_map_fds()
    registry = NamespaceRegistry()
    loaded = bpfload.load_and_attach(bpfload.Sizes(), registry)
    try:
        assert loaded.bpf.module is None, "bcc's module (LLVM, ~35 MiB) is still held"
        with pytest.raises(KeyError):
            loaded.bpf["no_such_map"]  # a clear error, not a call into the freed module
        assert loaded.counters()["ringbuf_full"] == 0  # maps answer through the fds kept
        # what a stream attaches later loads from the programs loaded before the release
        assert loaded.stream_hooks(True) == []
        assert loaded.streamed, "no stream hook attached"
        loaded.stream_hooks(False)
        # a namespace made now gets its own sk_lookup copy (compiled-in map fd numbers)
        assert loaded.lookup is not None
        registry.refresh()
        assert netns.inode in registry.by_inode
        attached, _ = loaded.lookup.follow(registry)
        assert attached >= 1 and not loaded.lookup.refused, loaded.lookup.refused
    finally:
        loaded.close()
    assert bpf_map_fds() == before, "a map fd of ours outlived close()"


def test_an_idle_agent_fits_its_memory_budget(fresh_agent):
    """The agent's own memory at start (anonymous: what mapped library pages another
    process shares cannot move): ~75 MiB while bcc's module was held, ~36 MiB without."""
    a: AgentProc = fresh_agent()
    parts = a.status()["rss_parts_bytes"]
    assert parts["anon"] < 55 * 2**20, parts
