from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockwatch import filters as flt
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState


def row(**kw) -> SockRow:
    base = dict(
        cookie=1,
        protocol=IPPROTO_TCP,
        family=4,
        state=TcpState.ESTABLISHED,
        local_address=ipaddress.ip_address("10.0.0.1"),
        local_port=443,
        remote_address=ipaddress.ip_address("192.0.2.7"),
        remote_port=51000,
        netns=4026531840,
        pid=100,
    )
    base.update(kw)
    return SockRow(**base)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": ["99999"]}, "out of range"),
        ({"port": ["-1"]}, "not a number"),
        ({"port": ["http"]}, "not a number"),
        ({"port": ["9000-8000"]}, "backwards"),
        ({"addr": ["10.0.0.300"]}, "not an IP address"),
        ({"addr": ["10.0.0.0/33"]}, "not an IP address"),
        ({"state": ["established-ish"]}, "not one of"),
        ({"protocol": ["sctp"]}, "not tcp or udp"),
        ({"pid": ["abc"]}, "not a number"),
        ({"pid": ["0"]}, "out of range"),
        ({"netns": ["-4"]}, "not a number"),
        ({"port": ["1_000"]}, "not a number"),
        ({"port": ["\u0661\u0662"]}, "not a number"),  # Arabic-Indic digits: int() takes them
        ({"pid": [str(2**64)]}, "out of range"),
        ({"netns": [str(2**64 + 1)]}, "out of range"),
        ({"port": ["8000-"]}, "not a number"),
        ({"addr": ["1" * 5000]}, "not an IP address"),
    ],
)
def test_malformed_filters_say_what_is_wrong(kwargs, message):
    with pytest.raises(flt.FilterError, match=message) as e:
        flt.build(**kwargs)
    assert len(str(e.value)) < 200  # never echoes a huge input back


def test_a_5000_digit_number_is_quoted_short():
    with pytest.raises(flt.FilterError) as e:
        flt.build(pid=["9" * 5000])
    assert len(str(e.value)) < 120 and "..." in str(e.value)


@pytest.mark.parametrize(
    "wire",
    [
        "x",
        [],
        {"addr": [1]},
        {"addr": "10.0.0.0/8"},
        {"port": [None]},
        {"pid": [True]},
        {"pid": [1.5]},
        {"state": [["listen"]]},
        {"nope": []},
        {"port": ["1"] * 1000},
        {"addr": [{"a": {"b": 1}}]},
    ],
)
def test_wire_filters_of_the_wrong_shape_are_refused(wire):
    with pytest.raises(flt.FilterError):
        flt.from_wire(wire)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from([*flt.WIRE_KEYS, "x"]), _json, max_size=4))
def test_any_json_filters_parse_or_raise_filter_error(wire):
    try:
        f = flt.from_wire(wire)
    except flt.FilterError:
        return
    assert flt.from_wire(f.to_wire()) == f


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_ports_in_range_parse_and_others_are_rejected(p):
    if 0 <= p <= 65535:
        assert flt.parse_port(str(p)) == (p, p)
    else:
        with pytest.raises(flt.FilterError):
            flt.parse_port(str(p))


def test_each_filter_matches_what_it_says():
    r = row()
    assert flt.build(protocol=["tcp"]).match(r)
    assert not flt.build(protocol=["udp"]).match(r)
    assert flt.build(port=["443"]).match(r)
    assert flt.build(port=["50000-52000"]).match(r)  # the remote port counts too
    assert not flt.build(port=["80"]).match(r)
    assert flt.build(addr=["10.0.0.0/8"]).match(r)
    assert flt.build(addr=["192.0.2.7"]).match(r)
    assert not flt.build(addr=["172.16.0.0/12"]).match(r)
    assert flt.build(state=["established"]).match(r)
    assert flt.build(state=["ESTAB", "listen"]).match(r)
    assert not flt.build(state=["time_wait"]).match(r)
    assert flt.build(pid=["100"]).match(r)
    assert not flt.build(pid=["101"]).match(r)
    assert flt.build(netns=["4026531840"]).match(r)
    assert not flt.build(protocol=["tcp"], port=["80"]).match(r)  # AND across options


def test_ipv4_filter_matches_v4_mapped_addresses_of_dual_stack_sockets():
    r = row(family=6, local_address=ipaddress.ip_address("::ffff:127.0.0.1"), remote_address=None, remote_port=0)
    assert flt.build(addr=["127.0.0.0/8"]).match(r)
    assert not flt.build(addr=["10.0.0.0/8"]).match(r)


def test_unconnected_port_zero_does_not_match_port_zero_filters_by_accident():
    r = row(protocol=IPPROTO_UDP, state=TcpState.CLOSE, remote_address=None, remote_port=0)
    assert not flt.build(port=["0-10"]).match(r)


def test_wire_round_trip():
    f = flt.build(protocol=["udp"], port=["53", "8000-8100"], addr=["::1"], state=["unconn"], pid=["7"], netns=["9"])
    assert flt.from_wire(f.to_wire()) == f


_FILTERS = [
    {"protocol": ["tcp"]}, {"protocol": ["udp"]}, {"port": ["443"]}, {"port": ["50000-52000"]}, {"port": ["80"]},
    {"addr": ["10.0.0.0/8"]}, {"addr": ["192.0.2.7"]}, {"addr": ["172.16.0.0/12"]}, {"addr": ["127.0.0.0/8"]},
    {"state": ["established"]}, {"state": ["listen"]}, {"pid": ["100"]}, {"pid": ["101"]}, {"netns": ["4026531840"]},
    {"protocol": ["tcp"], "port": ["80"]},
]  # fmt: skip
_ROWS = [
    row(),
    row(protocol=IPPROTO_UDP, state=TcpState.CLOSE, remote_address=None, remote_port=0, pid=None),
    row(
        family=6,
        local_address=ipaddress.ip_address("::ffff:127.0.0.1"),
        remote_address=None,
        remote_port=0,
        state=TcpState.LISTEN,
    ),
]


@pytest.mark.parametrize("kwargs", _FILTERS)
def test_a_streamed_event_matches_as_its_row_does(kwargs):
    """`live` filters events the stream sent before its filter changed: by the same rule
    over the event's fields as the agent's over rows."""
    f = flt.build(**kwargs)
    for r in _ROWS:
        assert f.match_event(r.as_dict()) == f.match(r), (kwargs, r)
    bind = {"kind": "bind_fail", "protocol": "tcp", "local_address": "10.0.0.1", "local_port": 443, "pid": 100,
            "netns": 4026531840}  # fmt: skip
    assert f.match_event(bind) == f.match(row(state=TcpState.ESTABLISHED, remote_port=0, remote_address=None)) or (
        "state" in kwargs  # an event without a state is not failed by a state filter
    )
