"""ss's filter words, as sockwatch takes them (ssfilter): what each means in sockwatch's
filters, and one clear refusal for what it does not take."""

from __future__ import annotations

import ipaddress

import pytest

from sockwatch import filters as flt
from sockwatch import ssfilter
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState


def lists(*words: str) -> dict[str, list[str]]:
    return {k: v for k, v in ssfilter.parse(list(words)).items() if v}


@pytest.mark.parametrize("words, want", [
    (["sport", "=", ":80"], {"sport": ["80-80"]}),
    (["sport = :80"], {"sport": ["80-80"]}),  # several words in one argument
    (["sport", ":80"], {"sport": ["80-80"]}),  # the operator is optional
    (["dport", "eq", "443"], {"dport": ["443-443"]}),
    (["sport", ">=", ":1024"], {"sport": ["1024-65535"]}),
    (["sport", "gt", ":1024"], {"sport": ["1025-65535"]}),
    (["dport", "<", ":1024"], {"dport": ["0-1023"]}),
    (["dport", "le", ":22"], {"dport": ["0-22"]}),
    (["sport", "=", ":ssh"], {"sport": ["22-22"]}),  # a service name
    (["src", "10.0.0.1"], {"src": ["10.0.0.1"]}),
    (["src", "10.0.0.0/8"], {"src": ["10.0.0.0/8"]}),
    (["src", "10.0.0.1:80"], {"src": ["10.0.0.1 port 80-80"]}),
    (["dst", "*:443"], {"dst": ["* port 443-443"]}),
    (["dst", ":443"], {"dst": ["* port 443-443"]}),
    (["dst", "[::1]:53"], {"dst": ["::1 port 53-53"]}),
    (["dst", "[fe80::]/10"], {"dst": ["fe80::/10"]}),
    (["src", "::1"], {"src": ["::1"]}),
    (["src", "=", "127.0.0.1"], {"src": ["127.0.0.1"]}),
    (["state", "established"], {"state": ["ESTAB"]}),
    (["state", "listening"], {"state": ["LISTEN"]}),
    (["state", "closed"], {"state": ["UNCONN"]}),
    (["state", "all"], {}),
    (["state", "bucket"], {"state": ["SYN-RECV", "TIME-WAIT"]}),
    (["state", "established", "state", "listening"], {"state": ["ESTAB", "LISTEN"]}),
    (["exclude", "time-wait", "exclude", "listening"],
     {"state": ["CLOSE-WAIT", "CLOSING", "ESTAB", "FIN-WAIT-1", "FIN-WAIT-2", "LAST-ACK", "SYN-RECV", "SYN-SENT",
                "UNCONN"]}),
    (["state", "connected", "exclude", "established"],
     {"state": ["CLOSE-WAIT", "CLOSING", "FIN-WAIT-1", "FIN-WAIT-2", "LAST-ACK", "SYN-RECV", "SYN-SENT",
                "TIME-WAIT"]}),
    (["sport = :80", "and", "dst", "10.0.0.0/8"], {"sport": ["80-80"], "dst": ["10.0.0.0/8"]}),
    (["sport = :80", "&&", "dport = :9"], {"sport": ["80-80"], "dport": ["9-9"]}),
    (["( sport = :80 or sport = :443 )"], {"sport": ["80-80", "443-443"]}),
    (["(", "dport", "=", ":ssh", "or", "sport", "=", ":ssh", ")"], {"port": ["22-22"]}),  # ss(8)'s example
    (["state", "established", "( dport = :ssh or sport = :ssh )"], {"state": ["ESTAB"], "port": ["22-22"]}),
])  # fmt: skip
def test_what_ss_words_mean(words, want):
    assert lists(*words) == want
    flt.build(**ssfilter.parse(words))  # and the filters take them


@pytest.mark.parametrize("words, says", [
    (["sport", "!=", ":80"], "negation"),
    (["not", "sport", ":80"], "negation"),
    (["sport = :80 or dport = :9"], "AND of ORs"),
    (["( sport = :80 or dst 10.0.0.1 )"], "'or' across"),
    (["( dport = :80 or sport = :81 )"], "'or' across"),  # either end only for the same port
    (["( ( sport = :80 ) )"], "nested"),
    (["( sport = :80"], "not closed"),
    (["()"], "empty"),
    (["sport"], "needs a value"),
    (["sport", "=", ":99999"], "0 to 65535"),
    (["sport", "=", ":no-such-service"], "/etc/services"),
    (["sport", "<", ":0"], "no port"),
    (["src", ">", "10.0.0.1"], "= only"),
    (["src", "10.0.0.300"], "not an IP address"),
    (["dev", "eth0"], "not a filter"),
    (["state", "bogus"], "not one of ss's"),
    (["state", "established", "state", "listening", "exclude", "all"], "no state"),
    (["exclude", "all"], "no state"),
])  # fmt: skip
def test_what_it_refuses_in_one_sentence(words, says):
    with pytest.raises(flt.FilterError) as e:
        flt.build(**ssfilter.parse(words))
    assert says in str(e.value) and "\n" not in str(e.value)


def row(local: tuple[str, int], remote: tuple[str, int] | None, proto: int = IPPROTO_TCP,
        state: int = TcpState.ESTABLISHED) -> SockRow:  # fmt: skip
    return SockRow(1, proto, 4, state, ipaddress.ip_address(local[0]), local[1],
                   ipaddress.ip_address(remote[0]) if remote else None, remote[1] if remote else 0)  # fmt: skip


@pytest.mark.parametrize("words, r, want", [
    ("sport = :80", row(("10.0.0.1", 80), ("10.0.0.2", 5000)), True),
    ("sport = :80", row(("10.0.0.1", 5000), ("10.0.0.2", 80)), False),  # the remote end: dport
    ("dport = :80", row(("10.0.0.1", 5000), ("10.0.0.2", 80)), True),
    ("dport = :0", row(("0.0.0.0", 53), None, IPPROTO_UDP, TcpState.CLOSE), True),  # no peer: port 0, as ss
    ("src 10.0.0.0/8", row(("10.0.0.1", 80), ("192.0.2.1", 5000)), True),
    ("src 10.0.0.0/8", row(("192.0.2.1", 80), ("10.0.0.1", 5000)), False),
    ("dst 10.0.0.0/8", row(("192.0.2.1", 80), ("10.0.0.1", 5000)), True),
    ("dst 10.0.0.1:5000", row(("192.0.2.1", 80), ("10.0.0.1", 5000)), True),
    ("dst 10.0.0.1:5001", row(("192.0.2.1", 80), ("10.0.0.1", 5000)), False),
    ("dst 10.0.0.0/8", row(("0.0.0.0", 80), None, state=TcpState.LISTEN), False),  # a listener has no peer
    ("src 10.0.0.0/8", row(("::ffff:10.0.0.1", 80), ("::ffff:10.0.0.2", 5000)), True),  # v4-mapped, as --addr
    ("( dport = :22 or sport = :22 )", row(("10.0.0.1", 22), ("10.0.0.2", 5000)), True),
    ("( dport = :22 or sport = :22 )", row(("10.0.0.1", 5000), ("10.0.0.2", 22)), True),
    ("sport >= :1024 dport = :443", row(("10.0.0.1", 40000), ("10.0.0.2", 443)), True),
    ("sport >= :1024 dport = :443", row(("10.0.0.1", 80), ("10.0.0.2", 443)), False),
])  # fmt: skip
def test_rows_they_match(words, r, want):
    f = flt.build(**ssfilter.parse([words]))
    assert f.match(r) is want
    again = flt.from_wire(f.to_wire())  # as the agent gets them
    assert again.match(r) is want and again == f


def test_the_wire_carries_the_new_keys_only_when_given():
    # an older agent refuses keys it does not know: without ss words, none are sent
    assert set(flt.build().to_wire()) == {
        "protocol",
        "port",
        "addr",
        "state",
        "pid",
        "netns",
    }  # an older agent takes it
    f = flt.build(**ssfilter.parse(["sport = :80 dport = :9 src 10.0.0.1 dst *:9"]))
    assert {"sport", "dport", "src", "dst"} <= set(f.to_wire())
    with pytest.raises(flt.FilterError):
        flt.from_wire({"src": ["10.0.0.1 port 99999-99999"]})
    with pytest.raises(flt.FilterError):
        flt.from_wire({"src": ["not an address"]})
