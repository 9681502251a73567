"""The socket-lookup hook (bpf/lookup.bpf.c): one copy of sw_lookup per network
namespace, each attached by a BPF link; what sw_lookup_miss needs to know of this
kernel (the NO_SOCKET drop reason's number, the drop sites); and reading what the
programs counted.

An SK_LOOKUP program cannot ask which namespace it runs in, so each namespace gets its
own copy of the compiled program with the namespace's cookie written over a marker
constant. The copy is loaded with BPF_PROG_LOAD as bcc loads the original (bcc has
already put the maps' descriptors into the instructions); the link holds it, and the
program is freed when the link is closed.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterable
from typing import Any

from sockwatch.events import address
from sockwatch.kernel import abi, syscalls
from sockwatch.kernel.links import Links, Target
from sockwatch.kernel.netns import Namespace, NamespaceGone, NamespaceRegistry
from sockwatch.lookups import Destination, Peer

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36  # enum bpf_attach_type
MAGIC = 0x5357C00C1E5EED01  # SW_NETNS_MAGIC in bpf/lookup.bpf.c
WHAT = "sk_lookup (lookups, misses, UDP peers)"

# Where a TCP or UDP packet is dropped because no socket took it (the receive functions,
# and their callers where a kernel inlines them).
DROP_FUNCTIONS = ("tcp_v4_rcv", "tcp_v6_rcv", "__udp4_lib_rcv", "udp_rcv", "__udp6_lib_rcv", "udpv6_rcv")
MAX_DROP_SITES = 8  # SW_DROP_SITES


class TemplateError(RuntimeError):
    pass


def template(code: bytes) -> tuple[bytes, int]:
    """The compiled sw_lookup and the offset of its one 64-bit load of MAGIC."""
    lo, hi = struct.pack("<I", MAGIC & 0xFFFFFFFF), struct.pack("<I", MAGIC >> 32)
    at = [
        i
        for i in range(0, len(code) - 15, 8)
        if code[i] == 0x18 and code[i + 1] >> 4 == 0 and code[i + 4 : i + 8] == lo and code[i + 12 : i + 16] == hi
    ]
    if len(at) != 1:
        raise TemplateError(f"sw_lookup loads its namespace marker {len(at)} times, not once")
    return code, at[0]


def patched(code: bytes, at: int, cookie: int) -> bytes:
    """The program with `cookie` in place of the marker (an ld_imm64 spans two instructions)."""
    out = bytearray(code)
    struct.pack_into("<I", out, at + 4, cookie & 0xFFFFFFFF)
    struct.pack_into("<I", out, at + 12, cookie >> 32)
    return bytes(out)


def prog_load(insns: bytes, name: bytes = b"sw_lookup") -> int:
    """BPF_PROG_LOAD of an SK_LOOKUP program; its fd. OSError with the verifier's last line."""
    return syscalls.prog_load(insns, BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP, name)


def drop_sites(kallsyms: str) -> list[tuple[int, int]]:
    """[start, end) of each of DROP_FUNCTIONS in the kernel's text (end: the next
    symbol's address). Empty when addresses are hidden (kptr_restrict)."""
    starts: dict[str, int] = {}
    addrs: list[int] = []
    for line in kallsyms.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[1] not in "tTwW":
            continue
        try:
            a = int(parts[0], 16)
        except ValueError:
            continue
        addrs.append(a)
        if parts[2] in DROP_FUNCTIONS and len(parts) == 3:  # the kernel's own, not a module's
            starts[parts[2]] = a
    if not addrs or not any(addrs) or not starts:
        return []
    addrs.sort()
    out = []
    for a in sorted(starts.values()):
        i = bisect.bisect_right(addrs, a)
        if i < len(addrs):
            out.append((a, addrs[i]))
    return out[:MAX_DROP_SITES]


def _version(family: int) -> int:
    return 4 if family == socket.AF_INET else 6


def _addr(family: int, raw: ctypes.Array) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return address(_version(family), bytes(raw))


def add_up(in_map: Iterable[tuple[bytes, int, int]], cached: Iterable[tuple[bytes, int, int]],
           last: dict[bytes, tuple[int, int]]) -> dict[bytes, tuple[int, int]]:  # fmt: skip
    """(lookups, misses) per key: the map's plus every cache slot's holding the key. The
    map is read before the caches, so a slot written back between the two reads is
    missed once (never counted twice): each count is kept from going below what `last`
    says was returned before, as a counter must, and `last` is updated."""
    totals: dict[bytes, list[int]] = {}
    for kb, lookups, misses in itertools.chain(in_map, cached):
        t = totals.setdefault(kb, [0, 0])
        t[0] += lookups
        t[1] += misses
    out = {}
    for kb, (lookups, misses) in totals.items():
        was = last.get(kb, (0, 0))
        out[kb] = last[kb] = (max(lookups, was[0]), max(misses, was[1]))
    return out


class LookupHook:
    """The sk_lookup program of every namespace the registry knows, attached by link."""

    def __init__(self, bpf: Any, links: Links) -> None:
        self.bpf = bpf
        self.links = links
        self._code, self._at = template(bytes(bpf.dump_func("sw_lookup")))
        self.refused: dict[int, str] = {}  # namespace cookie -> why its attach failed (not retried)
        self.over_cap = 0  # namespaces known but not hooked: --max-lookup-namespaces was reached
        self.cap = 0  # that maximum, as last given
        self.drop_sites_checked = False  # kernel addresses readable: misses told from other drops
        self.peers_forgotten = 0  # peers deleted with their namespace (not evictions)
        self._reported: dict[bytes, tuple[int, int]] = {}  # destination key -> (lookups, misses) last returned
        self._dead_lookups: dict[int, int] = {}  # forgotten namespace cookie -> reads in a row that found none
        self._dead_peers: dict[int, int] = {}

    def attach(self, ns: Namespace, registry: NamespaceRegistry) -> None:
        """Load ns's copy and link it to ns. NamespaceGone, or OSError from the kernel."""
        fd = registry.using_fd(ns, lambda nsfd: self.link(ns.cookie, nsfd))
        self.links.add(fd, WHAT, Target("netns", str(ns.inode), ns.cookie))

    def link(self, cookie: int, nsfd: int) -> int:
        """A link of the namespace's own copy (`cookie`: the namespace's, `nsfd` open on
        it): its fd, not kept in .links. OSError from the kernel."""
        prog = prog_load(patched(self._code, self._at, cookie))
        try:
            return syscalls.link_create(prog, nsfd, BPF_SK_LOOKUP)
        finally:
            os.close(prog)  # the link holds the program

    def follow(self, registry: NamespaceRegistry, cap: int = 1 << 16) -> tuple[int, int]:
        """Attach to each namespace the registry knows and we have not, up to `cap`
        hooked in all (first found, first hooked; a slot freed by a namespace that died
        goes to the next), release the links (and counts) of those it has forgotten:
        (attached, released)."""
        hooked = self.links.netns_cookies()
        known = registry.by_cookie
        released = 0
        for cookie in hooked - known.keys():
            released += self.links.release_netns(cookie)
            self.forget(cookie)
        for cookie in [c for c in self.refused if c not in known]:
            del self.refused[cookie]
        attached = 0
        self.cap = cap
        room = cap - len(hooked & known.keys())
        self.over_cap = 0
        for cookie, ns in list(known.items()):
            if cookie in hooked or cookie in self.refused:
                continue
            if room <= 0:
                self.over_cap += 1  # in the table all the same; its lookups are not counted
                continue
            try:
                self.attach(ns, registry)
                attached += 1
                room -= 1
            except NamespaceGone:
                continue  # check_alive will forget it
            except OSError as e:
                self.refused[cookie] = e.strerror or str(e)
        return attached, released

    def hooked(self) -> int:
        return len(self.links.netns_cookies())

    # ---- reading ------------------------------------------------------------------------

    def _items(self, name: str) -> list[tuple[Any, Any]]:
        table = self.bpf[name]
        try:
            return list(table.items_lookup_batch())
        except Exception:  # kernels without batch operations on this map type
            return list(table.items())

    def _slots(self, name: str, t: type[ctypes.Structure]) -> list[Any]:
        """Every CPU's slots of a per-CPU cache, as `t`."""
        try:
            self.bpf[name]
        except KeyError:  # peer_cache, under --max-udp-peers 0
            return []
        return [t.from_buffer_copy(bytes(v)) for _k, per_cpu in self._items(name) for v in per_cpu]

    def _sweep(self, dead: dict[int, int], seen: set[int]) -> None:
        """A forgotten namespace's keys can still come out of a cache slot (when another
        key takes the slot) until no slot holds them: its cookie is watched until two
        reads in a row find none (a slot written back between this read's two halves is
        seen by the next)."""
        for cookie in list(dead):
            dead[cookie] = 0 if cookie in seen else dead[cookie] + 1
            if dead[cookie] >= 2:
                del dead[cookie]

    def _read(self, name: str, key_t: type[ctypes.Structure], cache: str, cache_t: type[ctypes.Structure],
              dead: dict[int, int], filled: str) -> tuple[list[tuple[bytes, Any]], list[Any], int]:  # fmt: skip
        """One read of a map and of the per-CPU cache in front of it, the map first: its
        entries (key bytes, per-CPU values), the cache's occupied slots (`filled`: the
        field an empty slot has 0 in), and how many entries of forgotten namespaces it
        deleted (written back from a slot since they were forgotten)."""
        table = self.bpf[name]
        entries: list[tuple[bytes, Any]] = []
        seen: set[int] = set()
        deleted = 0
        for k, v in self._items(name):
            kb = bytes(k)
            cookie = key_t.from_buffer_copy(kb).netns_cookie  # type: ignore[attr-defined]
            if cookie in dead:
                seen.add(cookie)
                with contextlib.suppress(KeyError):
                    del table[k]
                    deleted += 1
                continue
            entries.append((kb, v))
        slots = []
        for e in self._slots(cache, cache_t):
            if not getattr(e, filled):
                continue
            if e.key.netns_cookie in dead:
                seen.add(e.key.netns_cookie)
                continue
            slots.append(e)
        self._sweep(dead, seen)
        return entries, slots, deleted

    def counts(self) -> list[Destination]:
        """Every destination counted, its `netns` the namespace's cookie (the agent names
        it by inode): lookup_counts plus what the CPUs' lookup_cache slots hold (see
        add_up)."""
        entries, slots, _ = self._read("lookup_counts", abi.SwLookupKey, "lookup_cache", abi.SwLookupCached,
                                       self._dead_lookups, "lookups")  # fmt: skip
        in_map = [(kb, sum(int(c.lookups) for c in v), sum(int(c.misses) for c in v)) for kb, v in entries]
        cached = [(bytes(e.key), int(e.lookups), int(e.misses)) for e in slots]
        out = []
        for kb, (lookups, misses) in add_up(in_map, cached, self._reported).items():
            key = abi.SwLookupKey.from_buffer_copy(kb)
            out.append(Destination(key.netns_cookie, key.protocol, _version(key.family), _addr(key.family, key.addr),
                                   key.port, lookups, misses))  # fmt: skip
        return out

    def peers(self) -> tuple[list[Peer], int]:
        """Every peer kept, its `netns` the namespace's cookie and `last_seen` in
        CLOCK_MONOTONIC seconds (the agent makes both its own): udp_peers plus what the
        CPUs' peer_cache slots hold; and how many entries udp_peers holds (for its
        evictions). An evicted peer that sends again starts from its new datagrams."""
        entries, slots, deleted = self._read("udp_peers", abi.SwPeerKey, "peer_cache", abi.SwPeerCached,
                                             self._dead_peers, "packets")  # fmt: skip
        self.peers_forgotten += deleted
        totals: dict[bytes, list[int]] = {}
        for kb, v in entries:
            packets = sum(int(c.packets) for c in v)
            if packets:
                totals[kb] = [packets, max(int(c.last_ns) for c in v)]
        in_map = len(totals)
        for q in slots:
            t = totals.setdefault(bytes(q.key), [0, 0])
            t[0] += q.packets
            t[1] = max(t[1], q.last_ns)
        out = []
        for kb, (packets, last_ns) in totals.items():
            key = abi.SwPeerKey.from_buffer_copy(kb)
            out.append(Peer(key.netns_cookie, _version(key.family), _addr(key.family, key.local_addr), key.local_port,
                            _addr(key.family, key.remote_addr), key.remote_port, packets, last_ns / 1e9))  # fmt: skip
        return out, in_map

    def forget(self, cookie: int) -> None:
        """A dead namespace's keys: nothing will count them again. Its peers are counted
        as forgotten, not as evicted. Cache slots may still hold some: they are dropped
        when they come out (see _sweep)."""
        for name, t in (("lookup_counts", abi.SwLookupKey), ("udp_peers", abi.SwPeerKey)):
            table = self.bpf[name]
            for k in list(table.keys()):
                if t.from_buffer_copy(k).netns_cookie == cookie:
                    try:
                        del table[k]
                    except KeyError:
                        continue
                    self.peers_forgotten += name == "udp_peers"
        self._dead_lookups[cookie] = 0
        self._dead_peers[cookie] = 0
        for kb in [kb for kb in self._reported if abi.SwLookupKey.from_buffer_copy(kb).netns_cookie == cookie]:
            del self._reported[kb]
