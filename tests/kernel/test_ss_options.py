"""ss's flags and filter words, option by option against ss itself on the same sockets:
`sockwatch snapshot <flags> <words>` must list exactly the sockets `ss <flags> <words>`
lists (sockwatch shows every state by default, so its bare flags are compared with
ss's -a). Standalone and against an agent, as the table's own tests."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import sockwatch_cmd
from tests.kernel import oracle
from tests.kernel.conftest import snapshot
from tests.kernel.test_table import mode  # noqa: F401 (the fixture: standalone, then an agent)

# (sockwatch's arguments, ss's): ss always with -n -e -p -H and, unless -l, -a
CASES = [
    (["-t"], ["-t"]),
    (["-u"], ["-u"]),
    (["-tu"], ["-tu"]),
    (["-l"], ["-tul"]),
    (["-t", "-l"], ["-tl"]),
    (["-u", "-l"], ["-ul"]),
    (["-t", "sport", "=", ":8080"], ["-t", "sport", "=", ":8080"]),
    (["-t", "dport = :8080"], ["-t", "dport", "=", ":8080"]),
    (["-tu", "sport", ">=", ":5000"], ["-tu", "sport", ">=", ":5000"]),
    (["-tu", "sport", "<", ":5000"], ["-tu", "sport", "<", ":5000"]),
    (["-tu", "src", "127.0.0.2"], ["-tu", "src", "127.0.0.2"]),
    (["-tu", "src", "127.0.0.0/8"], ["-tu", "src", "127.0.0.0/8"]),
    (["-t", "dst", "127.0.0.1:8080"], ["-t", "dst", "127.0.0.1:8080"]),
    (["-tu", "src", "[::1]:8443"], ["-tu", "src", "[::1]:8443"]),
    (["-t", "state", "established"], ["-t", "state", "established"]),
    (["-t", "state", "time-wait"], ["-t", "state", "time-wait"]),
    (["-t", "exclude", "time-wait"], ["-t", "exclude", "time-wait"]),
    (["-t", "state", "connected"], ["-t", "state", "connected"]),
    (["-u", "state", "closed"], ["-u", "state", "closed"]),
    (["-t", "( dport = :8080 or sport = :8080 )"],
     ["-t", "(", "dport", "=", ":8080", "or", "sport", "=", ":8080", ")"]),
    (["-t", "state", "established", "sport", "=", ":8080"], ["-t", "state", "established", "sport", "=", ":8080"]),
]  # fmt: skip


@pytest.fixture
def sockets(netns, child_factory):
    """Listeners (v4, v6), connections both ends, one in TIME-WAIT, UDP bound and connected."""
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=8080)
    c.do(op="tcp_listen", addr="::1", port=8443, family=6)
    for _ in range(2):
        c.do(op="tcp_connect", addr="127.0.0.1", port=8080, accept_on=lst["id"])
    tw = c.do(op="tcp_connect", addr="127.0.0.1", port=8080, accept_on=lst["id"])
    c.do(op="close", id=tw["id"])  # the client closes first: its end waits in TIME-WAIT
    c.do(op="close", id=tw["accepted"]["id"])
    c.do(op="udp_bind", addr="0.0.0.0", port=5353)
    c.do(op="udp_bind", addr="127.0.0.2", port=4000)
    c.do(op="udp_connect", addr="127.0.0.1", port=5353, bind_addr="127.0.0.2", bind_port=6000)
    return c


def ss_keys(ns: str, args: list[str]) -> set[oracle.Key]:
    flags = ["-nepH"] + ([] if any("l" in a for a in args if a.startswith("-")) else ["-a"])
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", *flags, *args], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    # ss leaves out the columns a filter makes all alike: Netid for one protocol, State
    # for one state; the oracle's parser wants them
    protocols = [p for p, letter in (("tcp", "t"), ("udp", "u")) if any(letter in a for a in args if a[0] == "-")]
    states = [ONE_STATE[args[i + 1]] for i, a in enumerate(args) if a == "state" and args[i + 1] in ONE_STATE]
    rows = [line.split() for line in out.splitlines()]
    if len(protocols) == 1:
        rows = [[protocols[0], *r] for r in rows]
    if len(states) == 1 and "exclude" not in args:
        rows = [[r[0], states[0], *r[1:]] for r in rows]
    out = "".join(" ".join(r) + "\n" for r in rows)
    return {r.key for r in oracle.parse(out)}


ONE_STATE = {"established": "ESTAB", "time-wait": "TIME-WAIT", "closed": "UNCONN", "listening": "LISTEN"}


@pytest.mark.parametrize("ours, theirs", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_the_same_sockets_as_ss(netns, mode, sockets, ours, theirs):  # noqa: F811
    want = ss_keys(netns.name, theirs)
    got = {oracle.key_of(r) for r in snapshot("--netns", str(netns.inode), *ours, socket=mode)}
    assert got == want, (
        f"\nonly in ss: {sorted(map(str, want - got))}\nonly in sockwatch: {sorted(map(str, got - want))}"
    )
    assert want, "a case that matches nothing proves little"


def test_the_table_flags(netns, sockets):
    """-H: one line per socket and nothing else; -e: the extended columns; neither cuts."""
    base = sockwatch_cmd("snapshot", "--standalone", "--netns", str(netns.inode), "-t")
    plain = subprocess.run(base, check=True, capture_output=True, text=True).stdout
    bare = subprocess.run([*base, "-H"], check=True, capture_output=True, text=True).stdout
    wide = subprocess.run([*base, "-e"], check=True, capture_output=True, text=True).stdout
    n = len(ss_keys(netns.name, ["-t"]))
    assert len(bare.splitlines()) == n and not any(line.startswith("#") for line in bare.splitlines())
    assert "COOKIE" in wide and "COOKIE" not in plain and "COMM" in plain
    for text in (plain, bare, wide):
        assert "…" not in text


def test_bad_ss_words_are_one_sentence(netns):
    r = subprocess.run(sockwatch_cmd("snapshot", "--standalone", "-t", "sport", "!=", ":80"), check=False,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2, r
    first, *rest = r.stderr.strip().splitlines()
    assert first.startswith("sockwatch: ") and "negation" in first and "Traceback" not in r.stderr
    assert all(line.startswith("  to fix:") for line in rest)  # the CLI's one sentence, and its hint


@pytest.mark.parametrize("flags", [[], ["-e"]], ids=["narrow", "extended"])
def test_nothing_is_cut_in_an_80_column_terminal(netns, sockets, flags):
    """In a real terminal (tmux, 80 columns): every address and owner whole, as ss prints
    them; a table wider than the terminal is not cut but printed as lines it wraps."""
    from tests.kernel.test_live import Terminal

    t = Terminal(sockwatch_cmd("snapshot", "--standalone", "--netns", str(netns.inode), *flags), 80, 50)
    try:
        screen = t.until(lambda s: "SOCKWATCH-EXITED" in s)
        assert "rc=0" in screen and "…" not in screen, screen
        flat = screen.replace("\n", "")  # a wrapped line is one line again
        for key in ss_keys(netns.name, ["-tu"]):
            local = f"[{key.local_address}]" if key.local_address.version == 6 else str(key.local_address)
            assert f"{local}:{key.local_port}" in flat, (key, screen)
        assert ("COOKIE" in flat) == bool(flags)
    finally:
        t.close()


QUEUES = """
import socket, sys
l = socket.socket(); l.bind(("127.0.0.1", 7801)); l.listen(3)
waiting = [socket.create_connection(("127.0.0.1", 7801)) for _ in range(2)]  # never accepted
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 7802))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in (100, 200, 300):
    s.sendto(b"x" * n, ("127.0.0.1", 7802))  # never read
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("flags", [["--standalone"], []], ids=["standalone", "agent"])
def test_queues_are_ss_recv_q_and_send_q(netns, agent, flags):
    """A listener's accept queue and its backlog, a UDP socket's bytes waiting: what ss
    prints as Recv-Q and Send-Q, in the JSON and the -e table; a connection's: not known."""
    import sys

    p = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", QUEUES], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout and p.stdout.readline().strip() == "ready"
        ss = subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-Hln", "-tu"], check=True, capture_output=True,
                            text=True).stdout  # fmt: skip
        theirs = {int(f[4].rsplit(":", 1)[1]): (int(f[2]), int(f[3])) for f in map(str.split, ss.splitlines())}
        assert theirs[7801] == (2, 3) and theirs[7802][0] > 600, ss  # (the kernel counts each datagram's buffer)
        where = flags or ["--socket", agent.socket]
        rows = snapshot("--netns", str(netns.inode), socket=None if flags else agent.socket)
        ours = {r["local_port"]: (r["recv_q"], r["send_q"]) for r in rows if r["state"] in ("LISTEN", "UNCONN")}
        assert ours[7801] == theirs[7801] and ours[7802] == theirs[7802], (ours, theirs)
        assert all((r["recv_q"], r["send_q"]) == (None, None) for r in rows if r["state"] == "ESTAB")
        table = subprocess.run(sockwatch_cmd("snapshot", "-e", "-H", "--netns", str(netns.inode), *where),
                               check=True, capture_output=True, text=True).stdout  # fmt: skip
        line = next(line for line in table.splitlines() if "127.0.0.1:7801" in line and "LISTEN" in line)
        assert line.split()[7:9] == ["2", "3"], line  # RECV-Q SEND-Q, after COMM
    finally:
        if p.stdin:
            p.stdin.close()
        p.wait(10)
