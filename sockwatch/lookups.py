"""What the socket-lookup hook counted, as the views show it (pure; no I/O, no root).

Each destination the kernel looked up a socket for (namespace, protocol, address,
port) is joined with the table: the socket(s) a packet there goes to, by the kernel's
lookup order (demux, the one implementation of it). Closed ports are the destinations
whose lookups found nothing, summed per port: what a scan looks like. Peers are the
remote ends sending to unconnected UDP sockets, with the socket they reach.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sockwatch import demux
from sockwatch.filters import Filters
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, SockRow, TcpState
from sockwatch.schema import FAMILY_NAMES

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
UDP_UNCONNECTED = 7  # the table's state for a UDP socket with no peer (TCP_CLOSE)


@dataclass(frozen=True)
class Destination:
    """A destination's counts. `netns`: the namespace's inode (as read from the maps by
    kernel/lookup.py: its cookie, until the agent resolves it)."""

    netns: int
    protocol: int
    family: int  # 4 or 6: the packet's
    address: Address
    port: int
    lookups: int
    misses: int


@dataclass(frozen=True)
class Peer:
    netns: int
    family: int
    local_address: Address
    local_port: int
    remote_address: Address
    remote_port: int
    packets: int
    last_seen: float  # wall-clock seconds (as read from the maps: CLOCK_MONOTONIC seconds)


def _receivers(rows: Iterable[SockRow]) -> dict[tuple[int, int, int], list[SockRow]]:
    """The sockets a lookup can find, by (netns, protocol, port): TCP listeners and
    unconnected UDP sockets (a connected one is matched before the hook runs)."""
    out: dict[tuple[int, int, int], list[SockRow]] = {}
    for r in rows:
        if (r.protocol == IPPROTO_TCP and r.state == TcpState.LISTEN) or (
            r.protocol == IPPROTO_UDP and r.remote_port == 0
        ):
            out.setdefault((r.netns, r.protocol, r.local_port), []).append(r)
    return out


def _socks(rows: Sequence[SockRow]) -> list[demux.Sock]:
    """The rows for demux. TCP listeners sharing an address and port are one reuseport
    group (listen() refuses the second otherwise), as demux.from_kernel marks them."""
    shared: dict[tuple, int] = {}
    for r in rows:
        if r.protocol == IPPROTO_TCP:
            k = (r.family, r.local_address)
            shared[k] = shared.get(k, 0) + 1
    return [demux.Sock(r.cookie, r.protocol, r.family, r.state, r.local_address, r.local_port,
                       reuseport=r.protocol == IPPROTO_TCP and shared[(r.family, r.local_address)] > 1)
            for r in rows]  # fmt: skip


def receivers_of(
    protocol: int, address: Address, port: int, candidates: Sequence[SockRow]
) -> tuple[list[SockRow], bool]:
    """The socket(s) a packet to (address, port) goes to among candidates (one namespace,
    protocol and port), and whether a reuseport group shares it. The table does not
    know IPV6_V6ONLY or SO_BINDTODEVICE: a socket they keep out may be named here, and
    its misses then say so."""
    if not candidates:
        return [], False
    by_cookie = {r.cookie: r for r in candidates}
    v = demux.lookup(demux.Packet(protocol, address, port), _socks(candidates))
    return [by_cookie[s.cookie] for s in v.sockets], v.reuseport


def _owner(r: SockRow) -> dict[str, Any]:
    return {
        "cookie": r.cookie,
        "pid": r.pid,
        "comm": r.comm,
        "container": r.container.as_dict() if r.container is not None else None,
    }


def virtual_row(netns: int, protocol: int, family: int, local: Address, port: int, owner: SockRow | None,
                 remote: Address | None = None, remote_port: int = 0) -> SockRow:  # fmt: skip
    """A row standing for a destination or a peer, for the filters the table's rows take."""
    state = TcpState.LISTEN if protocol == IPPROTO_TCP else UDP_UNCONNECTED
    return SockRow(0, protocol, family, state, local, port, remote, remote_port, netns=netns,
                   pid=owner.pid if owner else None)  # fmt: skip


def destinations(counts: Iterable[Destination], rows: Iterable[SockRow], f: Filters) -> list[dict[str, Any]]:
    """Every counted destination with the socket(s) it reaches, most lookups first."""
    index = _receivers(rows)
    out: list[dict[str, Any]] = []
    for d in counts:
        got, group = receivers_of(d.protocol, d.address, d.port, index.get((d.netns, d.protocol, d.port), []))
        if not f.empty and not f.match(virtual_row(d.netns, d.protocol, d.family, d.address, d.port,
                                                    got[0] if got else None)):  # fmt: skip
            continue
        out.append({
            "netns": d.netns,
            "protocol": PROTO_NAMES.get(d.protocol, str(d.protocol)),
            "family": FAMILY_NAMES[d.family],
            "address": str(d.address),
            "port": d.port,
            "lookups": d.lookups,
            "misses": d.misses,
            "sockets": [_owner(r) for r in got],
            "reuseport": group,
        })  # fmt: skip
    out.sort(key=lambda x: (-int(x["lookups"]), x["netns"], x["protocol"], x["port"], x["address"]))
    return out


def closed_ports(dests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Misses summed per (netns, protocol, port), most first: the ports probed that no
    socket answered (RST or ICMP port unreachable)."""
    by: dict[tuple[int, str, int], dict[str, Any]] = {}
    for d in dests:
        if not d["misses"]:
            continue
        k = (d["netns"], d["protocol"], d["port"])
        e = by.setdefault(k, {"netns": k[0], "protocol": k[1], "port": k[2], "misses": 0, "addresses": 0,
                              "open_now": False})  # fmt: skip
        e["misses"] += d["misses"]
        e["addresses"] += 1
        e["open_now"] = e["open_now"] or bool(d["sockets"])
    return sorted(by.values(), key=lambda e: (-e["misses"], e["netns"], e["protocol"], e["port"]))


def peers(found: Iterable[Peer], rows: Iterable[SockRow], f: Filters) -> list[dict[str, Any]]:
    """Peers of unconnected UDP sockets with the socket each reaches, most packets first."""
    index = _receivers(rows)
    out: list[dict[str, Any]] = []
    for p in found:
        got, _group = receivers_of(IPPROTO_UDP, p.local_address, p.local_port,
                                   index.get((p.netns, IPPROTO_UDP, p.local_port), []))  # fmt: skip
        if not f.empty and not f.match(virtual_row(p.netns, IPPROTO_UDP, p.family, p.local_address, p.local_port,
                                                    got[0] if got else None, p.remote_address,
                                                    p.remote_port)):  # fmt: skip
            continue
        out.append({
            "netns": p.netns,
            "family": FAMILY_NAMES[p.family],
            "local_address": str(p.local_address),
            "local_port": p.local_port,
            "remote_address": str(p.remote_address),
            "remote_port": p.remote_port,
            "packets": p.packets,
            "last_seen": round(p.last_seen, 3),
            "sockets": [_owner(r) for r in got],
        })  # fmt: skip
    out.sort(key=lambda x: (-int(x["packets"]), -float(x["last_seen"]), x["netns"], x["local_port"]))
    return out


def resolve(items: Iterable[Any], inode_of: Callable[[int], int | None]) -> list[tuple[int, Any]]:
    """(netns inode, item) for what the maps hold, keyed by namespace cookie; those of
    namespaces no longer known are left out."""
    out = []
    for it in items:
        inode = inode_of(it.netns)
        if inode is not None:
            out.append((inode, it))
    return out
