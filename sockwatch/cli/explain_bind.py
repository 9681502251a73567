"""`sockwatch explain bind`: would this bind() succeed now, and if not, which sockets
stand in its way and why (the rules: sockwatch/bindrules.py)."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from sockwatch.cli import args
from sockwatch.cli import options as opt
from sockwatch.cli.errors import EXIT_USAGE, fail, friendly
from sockwatch.cli.explain import namespace
from sockwatch.filters import shown
from sockwatch.model import PROTO_NUMBERS
from sockwatch.schema import stamped

if TYPE_CHECKING:
    from sockwatch import bindrules
    from sockwatch.kernel.netns import Namespace, NamespaceRegistry

BOUND_INACTIVE_STATE = 1 << 13  # sock_diag's bit for TCP sockets bound and not listening (Linux 6.5)
SYN_RECV = 3
TCP_LISTEN = 10
UDP_CONNECTED = 1  # a UDP socket's state once connected (TCP_ESTABLISHED)


def explain_bind(
    protocol: Annotated[str, typer.Argument(metavar="tcp|udp", help="tcp or udp.", show_default=False)],
    address: Annotated[
        str, typer.Argument(metavar="ADDR:PORT", help="What bind() asks for: ADDR:PORT ([ADDR]:PORT for IPv6).")
    ],
    reuseaddr: Annotated[bool, typer.Option("--reuseaddr", help="The socket sets SO_REUSEADDR first.")] = False,
    reuseport: Annotated[bool, typer.Option("--reuseport", help="The socket sets SO_REUSEPORT first.")] = False,
    v6only: Annotated[bool, typer.Option("--v6only", help="An IPv6 socket that sets IPV6_V6ONLY first.")] = False,
    device: Annotated[
        str, typer.Option("--device", metavar="DEV", help="The socket is bound to DEV first (SO_BINDTODEVICE).")
    ] = "",
    uid: Annotated[
        str,
        typer.Option(
            "--uid",
            metavar="UID",
            help="The owner's uid (default 0). Another uid is taken to lack CAP_NET_BIND_SERVICE, and "
            "SO_REUSEPORT is shared only with its own sockets.",
        ),
    ] = "0",
    netns: Annotated[
        str,
        typer.Option(
            "--netns", metavar="NETNS", help="Where: a name from ip netns list, a pid or an inode (default: here)."
        ),
    ] = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: the verdict, its steps, the sockets.")
    ] = False,
) -> None:
    """Would this bind() succeed now, and if not, which sockets stand in its way and why,
    in the kernel's own rules: a wildcard address against a specific one, SO_REUSEADDR
    (never against a listener), SO_REUSEPORT (both sockets, the same owner uid), IPv4
    and IPv6 sharing a port unless IPV6_V6ONLY, a bound device, TIME-WAIT holding the
    port, a port connect() took, privileged ports. Read from the kernel's tables now
    (sock_diag), each socket's options from the socket itself; nothing is bound.

    Exit status 0 either way; the verdict is in the output.

    Examples:

        sockwatch explain bind tcp 0.0.0.0:8080 --reuseaddr

        sockwatch explain bind udp '[::]:53' --reuseport --uid 101 --netns blue --json
    """
    from sockwatch import bindrules

    try:
        proto = PROTO_NUMBERS[protocol.strip().lower()]
    except KeyError:
        raise fail(f"protocol {shown(protocol)} is not tcp or udp", code=EXIT_USAGE) from None
    try:
        addr, port = args.endpoint(address, "address", lowest_port=0)
        owner = args.integer(uid, "--uid", 0, 2**32 - 2)
    except args.ArgError as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    if v6only and addr.version == 4:
        raise fail("--v6only is an IPv6 socket's option: give an IPv6 address", code=EXIT_USAGE)
    with friendly():
        inode = opt.netns_inode(netns) if netns else os.stat("/proc/self/ns/net").st_ino
        from sockwatch.kernel import prereq

        prereq.require_root()
        holders, ctx, ifindex, names, where = _read(inode, proto, port, device.strip())
        ask = bindrules.Bind(proto, addr, port, reuseaddr, reuseport, v6only, ifindex, owner,
                             can_bind_service=owner == 0)  # fmt: skip
        if any(_unread(h) for h in holders):  # what no system call or sock_diag gives: ask the kernel
            holders = _iterated(where, protocol.strip().lower(), port, holders) or holders
        v = bindrules.check(ask, holders, ctx)
        if proto == PROTO_NUMBERS["tcp"] and _kernel_before((6, 5)):
            v.notes.append("this kernel (before 6.5) does not list TCP sockets bound and not listening: "
                           "one holding the port is not seen")  # fmt: skip
        out = {
            "bind": {"protocol": protocol.strip().lower(), "address": str(addr), "port": port, "reuseaddr": reuseaddr,
                     "reuseport": reuseport, "v6only": v6only, "device": device.strip() or None, "uid": owner},
            "netns": inode,
            "succeeds": v.errno is None,
            "errno": v.errno,
            "certain": v.certain,
            "otherwise": None if v.certain else v.otherwise,
            "steps": v.steps,
            "conflicts": [_holder(c.holder, c.why, c.certain, names.get(c.holder.cookie)) for c in v.conflicts],
            "notes": v.notes,
        }  # fmt: skip
        sys.stdout.write(json.dumps(stamped(out), indent=2) + "\n" if as_json else _text(out))


def _read(
    inode: int, proto: int, port: int, dev: str
) -> tuple[list, bindrules.Context, int, dict[int, dict], tuple[NamespaceRegistry, Namespace]]:
    """The namespace's sockets on `port` as holders (their reuse flags read from each
    socket), what bind() checks besides them, the ifindex of `dev`, and the holders' owners."""
    import socket

    from sockwatch import bindrules, ports
    from sockwatch.kernel import procscan, sockdiag, sockopts
    from sockwatch.kernel.netns import in_netns

    reg, ns = namespace(inode)
    states = sockdiag.ALL_STATES | BOUND_INACTIVE_STATE
    with reg.reading():
        diags = [d for d in sockdiag.dump_all(reg.diag(ns), (proto,), states, attrs=True)
                 if d.local_port == port and not (d.state == SYN_RECV and not d.inode)]  # fmt: skip
    found = procscan.scan({d.inode for d in diags if d.inode})
    holders, owners = [], {}
    for d in diags:
        o = found.get(d.inode) if d.inode else None
        r = sockopts.peek(o.pid, o.fd, d.inode) if o is not None else None
        holders.append(bindrules.Holder(d.cookie, proto, d.family, d.state, d.local_address, d.local_port, d.v6only,
                                        d.bound_dev, r.reuseaddr if r else None, r.reuseport if r else None,
                                        d.uid))  # fmt: skip
        owners[d.cookie] = {"pid": o.pid if o else None, "comm": o.comm if o else None}

    def inside() -> tuple[str, str, int]:
        try:
            index = socket.if_nametoindex(dev) if dev else 0
        except OSError:
            raise fail(f"--device {shown(dev)}: no such device in netns {inode}", code=EXIT_USAGE) from None
        return _text_of("/proc/thread-self/net/fib_trie"), _text_of("/proc/thread-self/net/if_inet6"), index

    fib, inet6, index = reg.using_fd(ns, lambda fd: in_netns(fd, inside))
    local = bindrules.local_addresses(fib, inet6)
    v = reg.sysctls(ns, ("ipv4/ip_local_port_range", "ipv4/ip_local_reserved_ports", "ipv4/ip_unprivileged_port_start"))
    ctx = bindrules.Context(local if fib else None,
                            ports.parse_port_number(v["ipv4/ip_unprivileged_port_start"], "ip_unprivileged_port_start"),
                            ports.parse_range(v["ipv4/ip_local_port_range"]),
                            ports.parse_reserved(v["ipv4/ip_local_reserved_ports"]),
                            bindrules.v6_addresses(inet6) if inet6 else None)  # fmt: skip
    return holders, ctx, index, owners, (reg, ns)


def _unread(h: bindrules.Holder) -> bool:
    """A holder whose flags the reads so far leave unknown or wrong: a TIME-WAIT socket's
    reuse flags (no descriptor), one whose owner's descriptor could not be read, and a
    connection's IPV6_V6ONLY (sock_diag reports it for listening and unconnected sockets
    only)."""
    connected = h.state != TCP_LISTEN if h.protocol == PROTO_NUMBERS["tcp"] else h.state == UDP_CONNECTED
    return h.reuseaddr is None or h.reuseport is None or (h.family == 6 and connected)


def _iterated(where: tuple[NamespaceRegistry, Namespace], protocol: str, port: int, holders: list) -> list | None:
    """The holders with every socket's reuse flags as a BPF iterator reads them
    (sockflags), or None where the kernel offers no iterator (the verdict then says what
    it cannot know)."""
    from dataclasses import replace

    from sockwatch.kernel import sockflags
    from sockwatch.kernel.netns import in_netns

    try:
        reg, ns = where
        flags = sockflags.read(protocol, port, lambda fn: reg.using_fd(ns, lambda fd: in_netns(fd, fn)))
    except Exception:  # no BTF, no iterator, a refused program: the verdict says what it cannot know
        return None
    out = []
    for h in holders:
        f = flags.get(h.cookie)
        out.append(h if f is None else replace(h, reuseaddr=f.reuseaddr, reuseport=f.reuseport, v6only=f.v6only))
    return out


def _kernel_before(version: tuple[int, int]) -> bool:
    import platform
    import re

    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return m is not None and (int(m.group(1)), int(m.group(2))) < version


def _text_of(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _holder(h: object, why: str, certain: bool, owner: dict | None) -> dict:
    from sockwatch.model import PROTO_NAMES, STATE_NAMES, fmt_addr
    from sockwatch.schema import FAMILY_NAMES

    return {
        "cookie": h.cookie,  # type: ignore[attr-defined]
        "protocol": PROTO_NAMES[h.protocol],  # type: ignore[attr-defined]
        "family": FAMILY_NAMES[h.family],  # type: ignore[attr-defined]
        "state": STATE_NAMES.get(h.state, str(h.state)),  # type: ignore[attr-defined]
        "local_address": fmt_addr(h.local),  # type: ignore[attr-defined]
        "local_port": h.port,  # type: ignore[attr-defined]
        "v6only": h.v6only,  # type: ignore[attr-defined]
        "bound_dev": h.bound_dev,  # type: ignore[attr-defined]
        "reuseaddr": h.reuseaddr,  # type: ignore[attr-defined]
        "reuseport": h.reuseport,  # type: ignore[attr-defined]
        "uid": h.uid,  # type: ignore[attr-defined]
        "why": why,
        "certain": certain,
        **(owner or {"pid": None, "comm": None}),
    }


def _text(out: dict) -> str:
    from sockwatch.render import endpoint, printable_cell

    b = out["bind"]
    opts = [o for o in ("reuseaddr", "reuseport", "v6only") if b[o]]
    opts += [f"device {b['device']}"] if b["device"] else []
    head = f"bind {b['protocol']} {endpoint(b['address'], b['port'], 6 if ':' in b['address'] else 4)}"
    head += (f" ({', '.join(opts)})" if opts else "") + f" as uid {b['uid']} in netns {out['netns']}"
    lines = [head] + [f"  {i}. {printable_cell(s)}" for i, s in enumerate(out["steps"], 1)]
    if out["succeeds"]:
        lines.append("=> succeeds")
    else:
        lines.append(f"=> fails with {out['errno']}" + ("" if out["certain"] else (
            " unless the sockets whose flags cannot be read set them (then it succeeds)" if out["otherwise"] is None
            else f" (or {out['otherwise']})")))  # fmt: skip
    for c in out["conflicts"]:
        who = f"{c['pid']}/{printable_cell(c['comm'] or '')}" if c["pid"] is not None else "no owner (kernel-held)"
        where = endpoint(c["local_address"], c["local_port"], c["family"])
        lines.append(f"   held by socket {c['cookie']} {c['protocol']} {where} {c['state']}, {who}, uid {c['uid']}")
    lines += [f"  note: {printable_cell(n)}" for n in out["notes"]]
    return "\n".join(lines) + "\n"
