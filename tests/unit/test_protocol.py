"""The agent's wire format, both directions, against arbitrary bytes and JSON: a request
or answer either parses into the checked shape or raises ProtocolError (never anything
else), and filters inside a request either parse or raise FilterError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockwatch import filters as flt
from sockwatch.agent.protocol import ProtocolError, Request, encode_request, parse_header, parse_request

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
_requestish = st.fixed_dictionaries(
    {}, optional={"op": st.sampled_from(["snapshot", "status", "x"]) | _json, "filters": _json, "reconcile": _json}
)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_protocol_error(data):
    try:
        req = parse_request(data)
    except ProtocolError:
        return
    assert isinstance(req, Request) and req.op in ("snapshot", "status")


@given(_requestish | _json)
def test_any_json_request_parses_or_raises_protocol_error_and_its_filters_too(d):
    try:
        req = parse_request(json.dumps(d).encode())
    except ProtocolError:
        return
    assert isinstance(req.filters, dict) and isinstance(req.reconcile, bool)
    try:
        flt.from_wire(req.filters)
    except flt.FilterError as e:
        assert len(str(e)) < 300


@given(st.binary(max_size=300) | _json.map(lambda d: json.dumps(d).encode()))
def test_any_answer_header_parses_or_raises_protocol_error(data):
    try:
        h = parse_header(data)
    except ProtocolError:
        return
    assert isinstance(h["ok"], bool)


@pytest.mark.parametrize("depth", [10, 100_000])
def test_deep_nesting_is_an_error_not_a_crash(depth):
    with pytest.raises(ProtocolError):
        parse_request(b'{"op":"snapshot","filters":' + b"[" * depth + b"\n")


def test_what_the_cli_sends_is_what_the_agent_accepts():
    f = flt.build(protocol=["udp"], port=["53", "8000-8100"], addr=["10.0.0.0/8"], state=["unconn"], pid=["1"])
    req = parse_request(encode_request("snapshot", filters=f.to_wire()))
    assert req.op == "snapshot" and flt.from_wire(req.filters) == f
