"""`sockwatch explain`: which socket, and which process, the kernel hands a packet to,
and why, step by step."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from sockwatch.cli import args
from sockwatch.cli import options as opt
from sockwatch.cli.errors import EXIT_USAGE, fail, friendly
from sockwatch.filters import shown
from sockwatch.model import PROTO_NUMBERS, STATE_NAMES
from sockwatch.schema import FAMILY_NAMES, stamped

if TYPE_CHECKING:
    from sockwatch import demux
    from sockwatch.kernel.netns import Namespace, NamespaceRegistry


def explain(
    protocol: Annotated[str, typer.Argument(metavar="tcp|udp", help="tcp or udp.", show_default=False)],
    destination: Annotated[
        str, typer.Argument(metavar="ADDR:PORT", help="Where the packet goes: ADDR:PORT ([ADDR]:PORT for IPv6).")
    ],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            metavar="ADDR:PORT",
            help="Where it comes from, ADDR:PORT: connections and connected UDP sockets match on it.",
        ),
    ] = "",
    netns: Annotated[
        str,
        typer.Option(
            "--netns",
            metavar="NETNS",
            help="The namespace it arrives in: a name from ip netns "
            "list, a pid or an inode (default: sockwatch's own).",
        ),
    ] = "",
    dev: Annotated[
        str,
        typer.Option(
            "--dev",
            metavar="DEV",
            help="The device it arrives on (sockets bound with SO_BINDTODEVICE take only theirs); "
            "without it, an answer that depends on the device gives each case.",
        ),
    ] = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: the verdict, its steps, the sockets.")
    ] = False,
) -> None:
    """Which socket the kernel hands this packet to, and why, in the kernel's own order:
    an established 4-tuple first; then the listener (TCP) or socket (UDP) bound to the
    destination address over one bound to the wildcard; a dual-stack IPv6 socket taking
    IPv4; an SO_REUSEPORT group (one member per flow); SO_BINDTODEVICE; or nothing
    (RST, or ICMP port unreachable). Read from the kernel's tables now (sock_diag), with
    each socket's owner.

    `sockwatch explain bind tcp|udp ADDR:PORT` asks instead whether a bind() would
    succeed, and which sockets stand in its way (see `sockwatch explain bind --help`).

    Examples:

        sockwatch explain udp 127.0.0.53:53

        sockwatch explain tcp 10.0.0.1:443 --from 10.0.0.9:51000 --netns blue --json

        sockwatch explain tcp '[fe80::1]:9103' --dev eth0

        sockwatch explain bind tcp 0.0.0.0:8080 --reuseaddr
    """
    from sockwatch import demux

    try:
        proto = PROTO_NUMBERS[protocol.strip().lower()]
    except KeyError:
        raise fail(f"protocol {shown(protocol)} is not tcp or udp", code=EXIT_USAGE) from None
    try:
        dst, dport = args.endpoint(destination, "destination")
        src, sport = args.endpoint(source, "--from") if source else (None, 0)
    except args.ArgError as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    with friendly():
        inode = opt.netns_inode(netns) if netns else os.stat("/proc/self/ns/net").st_ino
        from sockwatch.kernel import prereq

        prereq.require_root()
        diags, names, ingress = _read(inode, proto, dev.strip())
        on_port = [d for d in diags if d.local_port == dport]
        owners, reuse = _owners(on_port)
        from sockwatch.kernel import bpflinks

        links = bpflinks.sk_lookup_links(inode)
        steering = [(link, prog) for link, prog, name in links if name != bpflinks.OBSERVER]
        verdict = demux.lookup(demux.Packet(proto, dst, dport, src, sport, ingress), demux.from_kernel(diags, reuse),
                               other_sk_lookup=bool(steering), dev_names=names)  # fmt: skip
        out = {
            "packet": {"protocol": protocol.strip().lower(), "destination": str(dst), "destination_port": dport,
                       "source": str(src) if src else None, "source_port": sport or None},
            "netns": inode,
            "reason": verdict.reason,
            "answer": verdict.answer or None,
            "reuseport": verdict.reuseport,
            "sk_lookup_programs": [prog for _link, prog in steering],
            "observed_by_sockwatch": len(steering) < len(links),
            "device": dev.strip() or None,
            "steps": verdict.steps,
            "sockets": [_sock(s, owners.get(s.cookie), names) for s in verdict.sockets],
            "by_device": [{"device": "other" if d == demux.OTHER_DEV else names.get(d), "ifindex": max(d, 0),
                           "reason": v.reason, "answer": v.answer or None,
                           "sockets": [s.cookie for s in v.sockets]} for d, v in verdict.by_device.items()],
        }  # fmt: skip
        sys.stdout.write(json.dumps(stamped(out), indent=2) + "\n" if as_json else _text(out))


def _read(inode: int, proto: int, dev: str) -> tuple[list, dict[int, str], int]:
    """The namespace's sockets of `proto`, the names of the devices they are bound to,
    and the ifindex of `dev` there (0: not given). Device numbers are per namespace:
    both are read inside it."""
    import socket

    from sockwatch.kernel import sockdiag
    from sockwatch.kernel.netns import device_names, in_netns

    reg, ns = namespace(inode)
    with reg.reading():
        diags = sockdiag.dump_all(reg.diag(ns), (proto,), attrs=True)
    bound = {d.bound_dev for d in diags if d.bound_dev}

    def inside() -> tuple[dict[int, str], int]:
        try:
            return device_names(bound), socket.if_nametoindex(dev) if dev else 0
        except OSError:
            raise fail(f"--dev {shown(dev)}: no such device in netns {inode}", code=EXIT_USAGE) from None

    return (diags, *reg.using_fd(ns, lambda fd: in_netns(fd, inside)))


def namespace(inode: int) -> tuple[NamespaceRegistry, Namespace]:
    """The namespace with this inode, and the registry that holds it open."""
    from sockwatch.kernel.netns import NamespaceRegistry

    reg = NamespaceRegistry()
    reg.refresh()
    ns = next((n for n in reg.by_cookie.values() if n.inode == inode), None)
    if ns is None:
        raise fail(f"no network namespace {inode} is reachable (no ip-netns name or process holds it)",
                   code=EXIT_USAGE)  # fmt: skip
    return reg, ns


def _owners(diags: list) -> tuple[dict[int, dict], dict[int, bool]]:
    """For the sockets on the port: cookie -> owner (pid, comm, container) from one
    /proc scan, and cookie -> SO_REUSEPORT read from the socket itself."""
    from sockwatch.containers import Resolver
    from sockwatch.kernel import procscan, sockopts

    found = procscan.scan({d.inode for d in diags if d.inode})
    resolver = Resolver()
    owners, reuse = {}, {}
    for d in diags:
        o = found.get(d.inode)
        if o is None:
            continue
        c = resolver.of_pid(o.pid)
        owners[d.cookie] = {"pid": o.pid, "comm": o.comm, "container": c.as_dict() if c is not None else None}
        r = sockopts.peek(o.pid, o.fd, d.inode)
        if r is not None:
            reuse[d.cookie] = r.reuseport
    return owners, reuse


def _sock(s: demux.Sock, owner: dict | None, names: dict[int, str]) -> dict:
    from sockwatch.model import PROTO_NAMES, fmt_addr

    return {
        "cookie": s.cookie,
        "protocol": PROTO_NAMES.get(s.protocol, str(s.protocol)),
        "family": FAMILY_NAMES[s.family],
        "state": STATE_NAMES.get(s.state, str(s.state)),
        "local_address": fmt_addr(s.local),
        "local_port": s.port,
        "remote_address": fmt_addr(s.remote) if s.remote is not None else None,
        "remote_port": s.remote_port if s.remote is not None else None,
        "v6only": s.v6only,
        "bound_dev": s.bound_dev,
        "device": names.get(s.bound_dev, str(s.bound_dev)) if s.bound_dev else None,
        "reuseport": s.reuseport,
        **(owner or {"pid": None, "comm": None, "container": None}),
    }


def _text(out: dict) -> str:
    from sockwatch.containers import Container
    from sockwatch.render import endpoint, family_digit, printable_cell

    p = out["packet"]
    fam = 6 if ":" in p["destination"] else 4
    head = f"{p['protocol']} {endpoint(p['destination'], p['destination_port'], fam)}"
    if p["source"]:
        head += f" from {endpoint(p['source'], p['source_port'], 6 if ':' in p['source'] else 4)}"
    lines = [f"{head} in netns {out['netns']}"]
    lines += [f"  {i}. {step}" for i, step in enumerate(out["steps"], 1)]
    if out["by_device"]:
        lines.append("=> depends on the device it arrives on (--dev):")
    elif not out["sockets"]:
        lines.append(f"=> no socket: the sender gets {out['answer']}")
    for s in out["sockets"]:
        who = f"{s['pid']}/{printable_cell(s['comm'] or '')}" if s["pid"] is not None else "no owner found"
        label = printable_cell(Container.label_of(s.get("container")))
        where = endpoint(s["local_address"], s["local_port"], s["family"], s.get("device"))
        lines.append(f"=> {'one of: ' if len(out['sockets']) > 1 and not out['by_device'] else ''}socket {s['cookie']} "
                     f"{s['protocol']}{family_digit(s['family'])} {where} {s['state']}, {who}"
                     + (f" [{label}]" if label else ""))  # fmt: skip
    return "\n".join(lines) + "\n"
