"""The drop hook (bpf/drops.bpf.c): what this kernel calls the drop reasons sockwatch
counts per socket, loading sw_drop as a BTF raw tracepoint program (which bcc cannot),
and reading what it counted.

sw_drop is compiled with the other programs; its instructions (bcc has put the maps'
descriptors into them) are loaded here with BPF_PROG_LOAD as BPF_PROG_TYPE_TRACING
against the BTF id of kfree_skb's tracepoint type in the kernel's own BTF
(/sys/kernel/btf/vmlinux, found through libbpf), and attached with
BPF_RAW_TRACEPOINT_OPEN, whose fd is a link: the kernel detaches it when the agent
exits, however it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterable
from typing import Any

from sockwatch.kernel import abi, syscalls
from sockwatch.kernel.btf import BTF_KIND_TYPEDEF, Btf

BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23  # enum bpf_attach_type
TRACEPOINT_TYPE = b"btf_trace_kfree_skb"  # the typedef the kernel declares for a tp_btf target
WHAT = "BTF tracepoint kfree_skb (drops per socket, by reason)"

# The drop reasons counted per socket: the socket was found and could not take the packet.
# (Drops before a socket is found are misses: lookup.bpf.c. TCP's own drops of segments
# it does not want, old or out of window, are the protocol at work, not a loss.)
REASONS = (
    "SOCKET_RCVBUFF",  # the receive buffer is full (UDP: UdpRcvbufErrors)
    "SOCKET_BACKLOG",  # the backlog of a socket owned by a user is full (TcpExtTCPBacklogDrop)
    "SOCKET_FILTER",  # a socket filter (SO_ATTACH_FILTER, BPF) refused it
    "PROTO_MEM",  # the protocol's memory (net.ipv4.udp_mem, tcp_mem) is spent
    "TCP_LISTEN_OVERFLOW",  # a listener's accept queue is full when the handshake completes
)


def reason_numbers(fmt: str) -> dict[str, int]:
    """Every drop reason's number on this kernel, from skb:kfree_skb's format file
    (`{ 6, "SOCKET_RCVBUFF" }`); empty where drops carry no reason (before 5.17)."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(r'\{\s*(\d+),\s*"(\w+)"\s*\}', fmt)}


def masks(numbers: dict[str, int]) -> tuple[int, int]:
    """SW_DROP_MASK_LO and _HI: bit n set for each of REASONS numbered n here (< 128)."""
    bits = 0
    for name in REASONS:
        n = numbers.get(name)
        if n is not None and 0 <= n < 128:
            bits |= 1 << n
    return bits & (2**64 - 1), bits >> 64


def missing_reasons(numbers: dict[str, int]) -> list[str]:
    """Which of REASONS this kernel does not have (its drops of that kind carry another
    reason, or none)."""
    return [r for r in REASONS if r not in numbers]


def _btf_id() -> int:
    """The BTF id of kfree_skb's tracepoint type in the kernel's BTF. OSError if none."""
    btf = Btf()
    try:
        return btf.find(TRACEPOINT_TYPE.decode(), BTF_KIND_TYPEDEF)
    finally:
        btf.close()


def prog_load(insns: bytes, btf_id: int, name: bytes = b"sw_drop") -> int:
    """BPF_PROG_LOAD of a tp_btf program for the tracepoint whose BTF id is `btf_id`; its
    fd. OSError with the verifier's last line."""
    return syscalls.prog_load(insns, BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP, name, btf_id)


def attach(insns: bytes) -> int:
    """Load sw_drop's instructions and attach them to kfree_skb: the link's fd. OSError."""
    prog = prog_load(insns, _btf_id())
    try:
        lib = syscalls.libbpf()
        fd = lib.bpf_raw_tracepoint_open(None, prog)  # a tracing program names its target by BTF id
        if fd < 0:
            err = -fd if fd < -1 else ctypes.get_errno()
            raise OSError(err, f"the kernel would not attach it ({os.strerror(err)})")
        return int(fd)
    finally:
        os.close(prog)  # the link holds the program


class DropCounts:
    """socket_drops as counted: per socket cookie, per reason name."""

    def __init__(self, bpf: Any, numbers: dict[str, int]) -> None:
        self.bpf = bpf
        self.names = {n: name for name, n in numbers.items() if name in REASONS}

    def _items(self) -> list[tuple[Any, Any]]:
        table = self.bpf["socket_drops"]
        try:
            return list(table.items_lookup_batch())
        except Exception:  # kernels without batch operations on this map type
            return list(table.items())

    def read(self) -> dict[int, dict[str, int]]:
        """cookie -> {reason: drops since the hook was attached}."""
        out: dict[int, dict[str, int]] = {}
        for k, per_cpu in self._items():
            key = abi.SwDropKey.from_buffer_copy(bytes(k))
            name = self.names.get(key.reason)
            if name is None:
                continue
            n = sum(int(v) for v in per_cpu)
            if n:
                by = out.setdefault(int(key.cookie), {})
                by[name] = by.get(name, 0) + n
        return out

    def forget(self, cookies: Iterable[int]) -> int:
        """Delete the keys of sockets that are gone (their counts were read); how many."""
        gone = set(cookies)
        if not gone:
            return 0
        table = self.bpf["socket_drops"]
        deleted = 0
        for k in list(table.keys()):
            if abi.SwDropKey.from_buffer_copy(bytes(k)).cookie in gone:
                with contextlib.suppress(KeyError):
                    del table[k]
                    deleted += 1
        return deleted
