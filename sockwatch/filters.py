"""Row filters from command-line text: parsed once, clear errors, pure."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sockwatch.model import PROTO_NUMBERS, STATE_NUMBERS, SockRow

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
# ss's src/dst: an address or CIDR (None: any) and a port range (None: any)
Endpoint = tuple[Net | None, tuple[int, int] | None]


class FilterError(ValueError):
    """A filter the user typed cannot be understood; the message says why."""


PID_MAX = 4_194_304  # PID_MAX_LIMIT on 64-bit kernels
NETNS_MAX = 2**32 - 1  # namespace inodes are 32-bit (proc_inum)
MAX_VALUES = 256  # values per filter on the wire
MAX_TEXT = 100  # characters in one filter value
# ASCII digits only: int() also takes '1_000', ' +5' and digits of other scripts
_DIGITS = re.compile(r"[0-9]{1,20}")


def shown(text: object) -> str:
    """User input as an error message quotes it: repr'd (no terminal escapes), cut short."""
    r = repr(str(text))
    return r if len(r) <= 60 else r[:56] + "...'"  # cut after escaping: one character may print as ten


def _number(text: str | int, what: str, lo: int, hi: int) -> int:
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise FilterError(f"{what} {shown(text)} is not a number")
    if isinstance(text, int):
        n = text
    else:
        if not _DIGITS.fullmatch(text.strip()):
            raise FilterError(f"{what} {shown(text)} is not a number")
        n = int(text.strip())
    if not lo <= n <= hi:
        raise FilterError(f"{what} {shown(text)} is out of range: {lo} to {hi}")
    return n


@dataclass(frozen=True)
class Filters:
    protocols: frozenset[int] = frozenset()
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges, local or remote
    networks: tuple[Net, ...] = ()  # local or remote address inside one of them
    states: frozenset[int] = frozenset()
    pids: frozenset[int] = frozenset()
    netns: frozenset[int] = frozenset()
    # ss's sport/dport/src/dst: one end only (local: s, remote: d)
    sports: tuple[tuple[int, int], ...] = ()
    dports: tuple[tuple[int, int], ...] = ()
    srcs: tuple[Endpoint, ...] = ()
    dsts: tuple[Endpoint, ...] = ()
    extra: tuple[Callable[[SockRow], bool], ...] = field(default=(), compare=False)

    def to_wire(self) -> dict:
        """JSON-safe form, sent to the agent (which parses it again: one code path)."""
        inv_state = {v: k for k, v in STATE_NUMBERS.items()}
        inv_proto = {v: k for k, v in PROTO_NUMBERS.items()}
        return {
            "protocol": sorted(inv_proto[p] for p in self.protocols),
            "port": [f"{a}-{b}" for a, b in self.ports],
            "addr": [str(n) for n in self.networks],
            "state": sorted(inv_state[s] for s in self.states),
            "pid": sorted(self.pids),
            "netns": sorted(self.netns),
            # only when given: an agent from before them refuses keys it does not know
            **({"sport": [f"{a}-{b}" for a, b in self.sports]} if self.sports else {}),
            **({"dport": [f"{a}-{b}" for a, b in self.dports]} if self.dports else {}),
            **({"src": [endpoint_text(e) for e in self.srcs]} if self.srcs else {}),
            **({"dst": [endpoint_text(e) for e in self.dsts]} if self.dsts else {}),
        }

    def match(self, row: SockRow) -> bool:
        addrs = (row.local_address,) if row.remote_address is None else (row.local_address, row.remote_address)
        if not self._match(row.protocol, row.state, row.pid, row.netns, (row.local_port, row.remote_port), addrs):
            return False
        return not self._ends or self._match_ends(row.local_address, row.local_port, row.remote_address,
                                                  row.remote_port)  # fmt: skip

    def match_event(self, e: dict) -> bool:
        """The same rule over a streamed event's own fields (`live` filters what the
        stream sent before its filter changed); a field the event lacks (a bind has no
        state) does not fail it."""
        addrs = []
        for key in ("local_address", "remote_address"):
            try:
                addrs.append(ipaddress.ip_address(e.get(key) or ""))
            except ValueError:
                continue
        ports = tuple(p for p in (e.get("local_port"), e.get("remote_port")) if isinstance(p, int))
        state = STATE_NUMBERS.get(str(e["state"])) if e.get("state") else None
        if not self._match(PROTO_NUMBERS.get(str(e.get("protocol", "")).lower(), 0), state, e.get("pid"),
                           e.get("netns"), ports, tuple(addrs)):  # fmt: skip
            return False
        if not self._ends:
            return True
        local, remote = (_address(e.get(k)) for k in ("local_address", "remote_address"))
        lport, rport = (p if isinstance(p, int) else None for p in (e.get("local_port"), e.get("remote_port")))
        if local is None or lport is None:
            return False
        return self._match_ends(local, lport, remote, rport)

    @property
    def _ends(self) -> bool:
        return bool(self.sports or self.dports or self.srcs or self.dsts)

    def _match_ends(self, local: Addr, lport: int, remote: Addr | None, rport: int | None) -> bool:
        """ss's sport/dport/src/dst: each of one end (an end not connected is port 0, no address)."""
        rport = rport or 0
        if self.sports and not any(lo <= lport <= hi for lo, hi in self.sports):
            return False
        if self.dports and not any(lo <= rport <= hi for lo, hi in self.dports):
            return False
        if self.srcs and not any(_at(local, lport, e) for e in self.srcs):
            return False
        return not self.dsts or any(_at(remote, rport, e) for e in self.dsts)

    def _match(self, protocol: int, state: int | None, pid: object, netns: object, ports: tuple[int | None, ...],
               addrs: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]) -> bool:  # fmt: skip
        if self.protocols and protocol not in self.protocols:
            return False
        if self.states and state is not None and state not in self.states:
            return False
        if self.pids and pid not in self.pids:
            return False
        if self.netns and netns not in self.netns:
            return False
        if self.ports and not any(lo <= p <= hi for lo, hi in self.ports for p in ports if p):
            return False
        return not self.networks or any(_in(a, n) for a in addrs for n in self.networks)

    @property
    def empty(self) -> bool:
        return not (self.protocols or self.ports or self.networks or self.states or self.pids or self.netns
                    or self._ends)  # fmt: skip


def _address(v: object) -> Addr | None:
    try:
        return ipaddress.ip_address(v) if isinstance(v, str) else None
    except ValueError:
        return None


def _at(addr: Addr | None, port: int, e: Endpoint) -> bool:
    net, ports = e
    if ports is not None and not ports[0] <= port <= ports[1]:
        return False
    return net is None or (addr is not None and _in(addr, net))


def endpoint_text(e: Endpoint) -> str:
    net, ports = e
    return ("*" if net is None else str(net)) + ("" if ports is None else f" port {ports[0]}-{ports[1]}")


def parse_endpoint(text: str) -> Endpoint:
    """'NET', '*', 'NET port LO-HI' or '* port LO-HI' (ssfilter's and the wire's form)."""
    addr, sep, port = text.strip().partition(" port ")
    net = None if addr.strip() == "*" else parse_network(addr)
    return net, parse_port(port) if sep else None


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, net: Net) -> bool:
    if addr.version != net.version:
        # an IPv4 filter also matches v4-mapped addresses of dual-stack sockets
        mapped = getattr(addr, "ipv4_mapped", None)
        return mapped is not None and net.version == 4 and mapped in net
    return addr in net


def parse_port(text: str) -> tuple[int, int]:
    """'53' or '8000-8100' -> inclusive range; ports are 0..65535."""
    lo_s, sep, hi_s = text.strip().partition("-")
    if not _DIGITS.fullmatch(lo_s.strip()) or (sep and not _DIGITS.fullmatch(hi_s.strip())):
        raise FilterError(f"port {shown(text)} is not a number or a range like 8000-8100")
    lo = _number(lo_s, "port", 0, 65535)
    hi = _number(hi_s, "port", 0, 65535) if sep else lo
    if lo > hi:
        raise FilterError(f"port range {shown(text)} is backwards: write {hi}-{lo}")
    return lo, hi


def parse_network(text: str) -> Net:
    if "%" in text:
        raise FilterError(f"address {shown(text)}: a scoped address (%DEVICE) is not supported in filters: give "
                          "the address alone (the device is in each row)")  # fmt: skip
    try:
        if len(text) > MAX_TEXT:
            raise ValueError
        return ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        raise FilterError(f"address {shown(text)} is not an IP address or CIDR (e.g. 10.0.0.0/8, ::1)") from None


def parse_state(text: str) -> int:
    name = text.strip().upper().replace("_", "-")
    aliases = {"ESTABLISHED": "ESTAB", "CLOSE": "UNCONN", "UNCONNECTED": "UNCONN", "TIMEWAIT": "TIME-WAIT"}
    name = aliases.get(name, name)
    if name not in STATE_NUMBERS:
        known = ", ".join(sorted(STATE_NUMBERS))
        raise FilterError(f"state {shown(text)} is not one of: {known}")
    return STATE_NUMBERS[name]


def parse_protocol(text: str) -> int:
    name = text.strip().lower()
    if name not in PROTO_NUMBERS:
        raise FilterError(f"protocol {shown(text)} is not tcp or udp")
    return PROTO_NUMBERS[name]


def build(
    protocol: Iterable[str] = (),
    port: Iterable[str] = (),
    addr: Iterable[str] = (),
    state: Iterable[str] = (),
    pid: Iterable[str | int] = (),
    netns: Iterable[str | int] = (),
    sport: Iterable[str] = (),
    dport: Iterable[str] = (),
    src: Iterable[str] = (),
    dst: Iterable[str] = (),
) -> Filters:
    """Parse every filter or raise FilterError naming the first bad one."""
    return Filters(
        protocols=frozenset(parse_protocol(p) for p in protocol),
        ports=tuple(parse_port(p) for p in port),
        networks=tuple(parse_network(a) for a in addr),
        states=frozenset(parse_state(s) for s in state),
        pids=frozenset(_number(p, "pid", 1, PID_MAX) for p in pid),
        netns=frozenset(_number(n, "netns", 1, NETNS_MAX) for n in netns),
        sports=tuple(parse_port(p) for p in sport),
        dports=tuple(parse_port(p) for p in dport),
        srcs=tuple(parse_endpoint(e) for e in src),
        dsts=tuple(parse_endpoint(e) for e in dst),
    )


WIRE_KEYS = ("protocol", "port", "addr", "state", "pid", "netns", "sport", "dport", "src", "dst")


def from_wire(d: object) -> Filters:
    """Filters from a request (untrusted JSON): every key, type and size checked."""
    if not isinstance(d, dict):
        raise FilterError("filters must be a JSON object")
    unknown = [k for k in d if k not in WIRE_KEYS]
    if unknown:
        raise FilterError(f"unknown filter {shown(unknown[0])}: use {', '.join(WIRE_KEYS)}")
    lists: dict[str, list] = {}
    for key in WIRE_KEYS:
        values = d.get(key, [])
        if not isinstance(values, list) or len(values) > MAX_VALUES:
            raise FilterError(f"filter {key!r} must be a list of at most {MAX_VALUES} values")
        numeric = key in ("pid", "netns")
        for v in values:
            text_ok = isinstance(v, str) and len(v) <= MAX_TEXT
            if not text_ok and not (numeric and isinstance(v, int) and not isinstance(v, bool)):
                raise FilterError(f"filter {key!r} has a value of the wrong type: {shown(v)}")
        lists[key] = values
    return build(**lists)
