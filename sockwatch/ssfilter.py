"""The part of ss's filter language sockwatch takes, after `snapshot`'s options:

    sockwatch snapshot -t state established '( dport = :ssh or sport = :ssh )'
    sockwatch snapshot -u sport = :53 src 127.0.0.0/8

A pure translation into the filter lists filters.build() takes, so an expression means
what the options do and goes to the agent the same way. What it takes (as ss(8) and
ss's own parser read them):

  state NAME | exclude NAME      ss's state names and groups (all, connected,
                                 synchronized, bucket, big); `exclude` takes the rest
  sport|dport [OP] [:]PORT       OP one of = == eq >= ge <= le > gt < lt; PORT a number
                                 or a service name (/etc/services)
  src|dst [=] ADDR[/LEN][:PORT]  an address, CIDR or `*`, with an optional port
  TERM [and|&&|&] TERM           every term holds (the default between terms)
  ( TERM or TERM ... )           any of them, for terms of one kind (`sport = :80 or
                                 sport = :443`), and ss's `( dport = :P or sport = :P )`
                                 for a port at either end

Anything else (not, !=, or across kinds, nested groups) is refused with one sentence:
sockwatch's filters are an AND of ORs, and a guess would show the wrong sockets.
"""

from __future__ import annotations

import re
import socket

from sockwatch.filters import FilterError, shown

# ss's state groups (ss.c: SS_CONN and friends), in sockwatch's state names
_ALL = ("ESTAB", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2", "TIME-WAIT", "UNCONN", "CLOSE-WAIT",
        "LAST-ACK", "LISTEN", "CLOSING")  # fmt: skip
_GROUPS: dict[str, tuple[str, ...]] = {
    "all": _ALL,
    "connected": tuple(s for s in _ALL if s not in ("LISTEN", "UNCONN")),
    "synchronized": tuple(s for s in _ALL if s not in ("LISTEN", "UNCONN", "SYN-SENT")),
    "bucket": ("SYN-RECV", "TIME-WAIT"),
    "big": tuple(s for s in _ALL if s not in ("SYN-RECV", "TIME-WAIT")),
}
_STATE_NAMES = {
    "established": "ESTAB", "syn-sent": "SYN-SENT", "syn-recv": "SYN-RECV", "fin-wait-1": "FIN-WAIT-1",
    "fin-wait-2": "FIN-WAIT-2", "time-wait": "TIME-WAIT", "closed": "UNCONN", "close-wait": "CLOSE-WAIT",
    "last-ack": "LAST-ACK", "listening": "LISTEN", "closing": "CLOSING",
    # as ss prints them, too
    "estab": "ESTAB", "listen": "LISTEN", "unconn": "UNCONN",
}  # fmt: skip
_OPS = {"=": "=", "==": "=", "eq": "=", ">=": ">=", "ge": ">=", "<=": "<=", "le": "<=", ">": ">", "gt": ">",
        "<": "<", "lt": "<"}  # fmt: skip
_NEGATIONS = {"!=", "ne", "neq", "not", "!"}
_AND = {"and", "&", "&&"}
_OR = {"or", "|", "||"}
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
KEYS = ("state", "sport", "dport", "src", "dst", "port")


def parse(words: list[str]) -> dict[str, list[str]]:
    """ss filter words (as given on the command line: one word per argument, or
    several in one) -> lists for filters.build(): state, sport, dport, src, dst, port.
    FilterError names what it cannot take."""
    tokens = [t for w in words for t in _TOKEN.findall(w)]
    out: dict[str, list[str]] = {k: [] for k in KEYS}
    states: set[str] | None = None  # None: no state term yet (all)
    i = 0
    while i < len(tokens):
        t = tokens[i].lower()
        if t in _AND:
            i += 1
            continue
        if t in _OR:
            raise FilterError(f"{shown(tokens[i])} between terms of different kinds is not taken: "
                              "sockwatch's filters are an AND of ORs (group one kind in parentheses)")  # fmt: skip
        if t in ("state", "exclude"):
            names = set(_states(_word(tokens, i + 1, t)))
            if t == "state":  # as ss: each `state` adds to what is shown, each `exclude` takes away
                states = names if states is None else states | names
            else:
                states = (set(_ALL) if states is None else states) - names
            i += 2
            continue
        if t == "(":
            close = _closing(tokens, i)
            _group(tokens[i + 1 : close], out)
            i = close + 1
            continue
        kind, value, i = _term(tokens, i)
        out[kind].append(value)
    if states is not None:
        if not states:
            raise FilterError("the state terms leave no state to show")
        if states != set(_ALL):
            out["state"] = sorted(states)
    return out


def _word(tokens: list[str], i: int, after: str) -> str:
    if i >= len(tokens) or tokens[i] in ("(", ")"):
        raise FilterError(f"{shown(after)} needs a value")
    return tokens[i]


def _states(name: str) -> tuple[str, ...]:
    n = name.lower().replace("_", "-")
    if n in _GROUPS:
        return _GROUPS[n]
    if n in _STATE_NAMES:
        return (_STATE_NAMES[n],)
    known = ", ".join(sorted([*_GROUPS, *_STATE_NAMES]))
    raise FilterError(f"state {shown(name)} is not one of ss's: {known}")


def _closing(tokens: list[str], i: int) -> int:
    for j in range(i + 1, len(tokens)):
        if tokens[j] == "(":
            raise FilterError("nested parentheses are not taken: sockwatch's filters are an AND of ORs")
        if tokens[j] == ")":
            return j
    raise FilterError("a '(' is not closed")


def _group(tokens: list[str], out: dict[str, list[str]]) -> None:
    """( TERM or TERM ... ): terms of one kind, or sport/dport of the same ports (either end)."""
    terms: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        if tokens[i].lower() in _OR:
            i += 1
            continue
        if tokens[i].lower() in _AND:
            raise FilterError("'and' inside parentheses is not taken: write it outside them")
        kind, value, i = _term(tokens, i)
        terms.append((kind, value))
    if not terms:
        raise FilterError("empty parentheses")
    kinds = {k for k, _ in terms}
    if len(kinds) == 1:
        out[terms[0][0]].extend(v for _, v in terms)
    elif kinds == {"sport", "dport"} and {v for k, v in terms if k == "sport"} == {v for k, v in terms if k == "dport"}:
        out["port"].extend(sorted({v for _, v in terms}))  # either end: --port
    else:
        raise FilterError(f"'or' across {' and '.join(sorted(kinds))} is not taken: sockwatch's filters are an "
                          "AND of ORs (only ( dport = :P or sport = :P ) mixes kinds)")  # fmt: skip


def _term(tokens: list[str], i: int) -> tuple[str, str, int]:
    """One sport/dport/src/dst term at tokens[i]: (its list, its value, the next index)."""
    t = tokens[i].lower()
    if t in ("sport", "dport"):
        op, i = _op(tokens, i + 1, t)
        return t, _port_range(_word(tokens, i, t), op), i + 1
    if t in ("src", "dst"):
        op, i = _op(tokens, i + 1, t)
        if op != "=":
            raise FilterError(f"{t} takes = only (an address has no order)")
        return t, _host(_word(tokens, i, t)), i + 1
    if t in _NEGATIONS:
        raise FilterError(f"{shown(tokens[i])}: negation is not taken (use exclude for states)")
    raise FilterError(f"{shown(tokens[i])} is not a filter sockwatch takes: state, exclude, sport, dport, src, dst")


def _op(tokens: list[str], i: int, after: str) -> tuple[str, int]:
    t = _word(tokens, i, after).lower()
    if t in _NEGATIONS:
        raise FilterError(f"{after} {shown(tokens[i])}: negation is not taken")
    if t in _OPS:
        return _OPS[t], i + 1
    return "=", i


def _port(text: str) -> int:
    p = text[1:] if text.startswith(":") else text
    if p.isascii() and p.isdigit() and len(p) <= 5 and int(p) <= 65535:
        return int(p)
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]{0,31}", p):
        try:
            return socket.getservbyname(p)
        except OSError:
            raise FilterError(f"port {shown(text)} is not a number or a service in /etc/services") from None
    raise FilterError(f"port {shown(text)} is not a number 0 to 65535 or a service name")


def _port_range(text: str, op: str) -> str:
    p = _port(text)
    lo, hi = {"=": (p, p), ">=": (p, 65535), "<=": (0, p), ">": (p + 1, 65535), "<": (0, p - 1)}[op]
    if lo > hi:
        raise FilterError(f"no port is {op} {p}")
    return f"{lo}-{hi}"


def _host(text: str) -> str:
    """ADDR[/LEN][:PORT], [V6][/LEN][:PORT], *:PORT or :PORT -> 'NET' or 'NET port LO-HI'."""
    addr, port = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise FilterError(f"address {shown(text)}: a '[' is not closed")
        addr, rest = text[1:close], text[close + 1 :]
        if rest.startswith("/"):
            prefix, _, port = rest[1:].partition(":")
            addr += "/" + prefix
        elif rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise FilterError(f"address {shown(text)} is not ADDR[/LEN][:PORT]")
    elif text.count(":") == 1:  # IPv4, * or nothing, with a port (IPv6 with one needs [ ])
        addr, _, port = text.rpartition(":")
    if addr in ("", "*"):
        addr = "*"
    out = addr
    if port:
        p = _port(port)
        out += f" port {p}-{p}"
    return out
