from __future__ import annotations

import ipaddress
import json

from sockwatch.containers import Container
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, SockRow, TcpState, fmt_addr, render_json, row_json, sort_key


def mk(protocol=IPPROTO_TCP, state=TcpState.LISTEN, local="0.0.0.0", lport=80, remote=None, rport=0, cookie=1):
    la = ipaddress.ip_address(local)
    return SockRow(
        cookie=cookie,
        protocol=protocol,
        family=la.version,
        state=state,
        local_address=la,
        local_port=lport,
        remote_address=ipaddress.ip_address(remote) if remote else None,
        remote_port=rport,
    )


def test_visible_is_what_the_kernel_hashes():
    assert mk().visible
    assert mk(protocol=IPPROTO_UDP, state=TcpState.CLOSE).visible  # unconnected UDP
    assert not mk(state=TcpState.CLOSE).visible  # bound-only TCP: not in ss -ta
    assert not mk(lport=0).visible  # IP_BIND_ADDRESS_NO_PORT before connect
    assert mk(state=TcpState.TIME_WAIT, remote="10.0.0.2", rport=5).visible


def test_keys_follow_the_kernel():
    udp = mk(protocol=IPPROTO_UDP, state=TcpState.CLOSE, local="0.0.0.0", lport=53)
    conn = mk(state=TcpState.ESTABLISHED, local="10.0.0.1", lport=80, remote="10.0.0.2", rport=4000)
    assert udp.key() == (0, IPPROTO_UDP, ipaddress.ip_address("0.0.0.0"), 53)
    assert len(conn.key()) == 6


def test_json_has_the_documented_keys_and_ss_state_names():
    r = mk(protocol=IPPROTO_UDP, state=TcpState.CLOSE, local="::ffff:127.0.0.1", lport=53)
    d = json.loads(row_json(r))
    assert set(d) >= {
        "protocol",
        "family",
        "state",
        "local_address",
        "local_port",
        "remote_address",
        "remote_port",
        "pid",
        "comm",
        "uid",
        "inode",
        "cookie",
        "netns",
    }
    assert (d["protocol"], d["family"], d["state"], d["local_address"]) == ("udp", "ipv6", "UNCONN", "::ffff:127.0.0.1")
    assert (d["remote_address"], d["remote_port"]) == (None, None)  # no peer: both null


def test_from_dict_inverts_as_dict():
    rows = [
        mk(),
        mk(protocol=IPPROTO_UDP, state=TcpState.CLOSE, local="::ffff:127.0.0.1", lport=53),
        mk(state=TcpState.TIME_WAIT, local="2001:db8::1", lport=443, remote="2001:db8::2", rport=40000),
    ]
    rows[0].pid, rows[0].comm, rows[0].uid, rows[0].inode, rows[0].owner_source = 7, "nginx", 33, 1234, "hook"
    for r in rows:
        assert SockRow.from_dict(r.as_dict()).as_dict() == r.as_dict()


def _dumps(r: SockRow) -> str:
    return json.dumps(r.as_dict(), separators=(",", ":"))


def test_row_json_is_json_dumps_byte_for_byte():
    odd = mk(state=TcpState.ESTABLISHED, local="::ffff:10.0.0.1", lport=443, remote="::ffff:10.0.0.2", rport=5)
    odd.pid, odd.uid, odd.inode, odd.comm, odd.owner_source = 1, 0, 0, 'a"b\\c\x01\u00e9\u2028', "proc"
    odd.container = Container("/kubepods/x", "containerd", "ab" * 32, "web", "default", "web-1", "u-1")
    rows = [
        mk(),
        odd,
        mk(protocol=IPPROTO_UDP, state=TcpState.CLOSE, local="fe80::1", lport=546),
        mk(state=TcpState.TIME_WAIT, local="2001:db8::1", lport=443, remote="2001:db8::2", rport=40000),
        mk(state=TcpState.ESTABLISHED, remote="10.0.0.9", rport=0),  # no remote port: not a connection
        mk(state=99),  # a state this version has no name for
        mk(protocol=132),  # nor a protocol
    ]
    rows[0].container = Container("/system.slice/nginx.service", "systemd", "nginx.service")
    rows[2].bound_dev, rows[2].device = 5, "vA0"  # SO_BINDTODEVICE, named
    rows[3].bound_dev = 7  # bound, its name not read yet: shown by index
    for r in rows:
        assert row_json(r) == _dumps(r)
    assert [json.loads(row_json(r))["device"] for r in rows[:4]] == [None, None, "vA0", "if7"]
    r = rows[0]
    r.state = TcpState.CLOSE_WAIT  # nothing cached per row: a change shows at once
    assert row_json(r) == _dumps(r) and json.loads(row_json(r))["state"] == "CLOSE-WAIT"


def test_render_json_is_one_array():
    rows = [mk(cookie=i, lport=1000 + i) for i in range(5)]
    assert [d["cookie"] for d in json.loads(render_json(rows))] == list(range(5))
    assert json.loads(render_json([])) == []
    many = [mk(cookie=i, lport=i % 65536) for i in range(10_000)]  # more than one slice
    assert render_json(many) == ("[" + ",\n".join(map(_dumps, many)) + "]\n").encode()


def test_grouping_udp_then_listeners_then_connections():
    conn = mk(state=TcpState.ESTABLISHED, lport=1, remote="10.0.0.2", rport=4000)
    lst = mk(lport=9)
    udp = mk(protocol=IPPROTO_UDP, state=TcpState.CLOSE, lport=65000)
    assert sorted([conn, lst, udp], key=sort_key) == [udp, lst, conn]


def test_fmt_addr_keeps_dotted_quads_of_mapped_addresses():
    assert fmt_addr(ipaddress.ip_address("::ffff:10.1.2.3")) == "::ffff:10.1.2.3"
    assert fmt_addr(ipaddress.ip_address("2001:db8::1")) == "2001:db8::1"
