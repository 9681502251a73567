"""The agent is root on someone's host: it never touches what is not its own at its
socket path, never dies of a client's request, and never lets a client stall its loop."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from sockwatch.agent import client
from tests.conftest import PACE, sockwatch_cmd
from tests.kernel.conftest import snapshot


def serve(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sockwatch_cmd("serve", "--socket", path), check=False, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def scratch():
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="sw-safety-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_a_regular_file_at_the_socket_path_is_left_alone(scratch):
    path = os.path.join(scratch, "agent.sock")
    with open(path, "w") as f:
        f.write("precious")
    r = serve(path)
    assert r.returncode == 2 and "is not a socket" in r.stderr and "Traceback" not in r.stderr
    assert open(path).read() == "precious" and not os.path.exists(path + ".lock")
    assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o755


def test_another_programs_live_socket_is_left_alone(scratch):
    path = os.path.join(scratch, "theirs.sock")
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.bind(path)
    theirs.listen(1)
    try:
        r = serve(path)
        assert r.returncode == 2 and "another program's live socket" in r.stderr, r.stderr
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)  # still theirs, still live
        c.close()
        assert not os.path.exists(path + ".lock")
    finally:
        theirs.close()


def test_a_foreign_lock_file_name_is_left_alone(scratch):
    path = os.path.join(scratch, "agent.sock")
    with open(path + ".lock", "w") as f:
        f.write("not a pid, somebody's data\n")
    r = serve(path)
    assert r.returncode == 2 and "not sockwatch's lock file" in r.stderr
    assert open(path + ".lock").read() == "not a pid, somebody's data\n"


def test_an_existing_directory_keeps_its_mode_and_stays(fresh_agent, scratch):
    os.chmod(scratch, 0o751)
    a = fresh_agent(os.path.join(scratch, "agent.sock"))
    assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o751
    assert stat.S_IMODE(os.stat(a.socket).st_mode) == 0o600
    a.stop()
    assert os.path.isdir(scratch) and stat.S_IMODE(os.stat(scratch).st_mode) == 0o751
    assert os.listdir(scratch) == []


def test_directories_it_creates_are_private_and_removed(fresh_agent, scratch):
    top = os.path.join(scratch, "a")
    a = fresh_agent(os.path.join(top, "b", "agent.sock"))
    assert stat.S_IMODE(os.stat(top).st_mode) == 0o700
    a.stop()
    assert os.listdir(scratch) == []


def raw(path: str, data: bytes, timeout: float = 10) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    with s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


BAD_REQUESTS = [
    b'{"op":"snapshot","filters":{"addr":[1]}}\n',
    b'{"op":"snapshot","filters":"x"}\n',
    b'{"op":"snapshot","filters":{"port":[80]}}\n',
    b'{"op":"snapshot","filters":{"pid":["1_000"]}}\n',
    b'{"op":"status","reconcile":"yes"}\n',
    b'{"op":7}\n',
    b'{"op":"shutdown"}\n',
    b"[]\n",
    b"\xff\xfe\n",
    b"null\n",
    b'{"op":"snapshot","filters":' + b"[" * 50000 + b"\n",
    b"x" * 70000,
]


def test_no_request_kills_the_agent(agent):
    for req in BAD_REQUESTS:
        try:
            answer = raw(agent.socket, req)
        except ConnectionResetError:
            # an oversized request is answered and closed while its tail is unread: the
            # kernel may turn that close into a reset
            assert len(req) > 65536
            continue
        header = json.loads(answer.split(b"\n", 1)[0])
        assert header["ok"] is False and isinstance(header["error"], str), (req[:60], answer[:200])
        assert agent.proc.poll() is None
    dropped = agent.status()["clients_dropped"]
    assert dropped.get("internal_error", 0) == 0 and dropped.get("oversized", 0) >= 1


def test_idle_and_stuck_clients_do_not_stall_the_agent(fresh_agent):
    a = fresh_agent()
    idle = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(a.socket)
        idle.append(s)
    # a client that asks for a snapshot and never reads it
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(a.socket)
    stuck.sendall(b'{"op":"snapshot"}\n')
    t0 = time.monotonic()
    got = client.request("status", a.socket)  # in process: the agent's answer, not a CLI's start-up
    assert time.monotonic() - t0 < 2, "status waited for idle clients"
    assert got is not None
    st = json.loads(got[1])
    assert st["clients"] >= 4
    # SIGTERM with all of them still connected: gone within a second (not after the stuck
    # client's answer deadline, a minute)
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(5 * PACE)
    assert time.monotonic() - t0 < 1.0 * PACE
    assert not os.path.exists(a.socket) and not os.path.exists(a.socket + ".lock")
    for s in [*idle, stuck]:
        s.close()


def test_an_idle_client_is_dropped_at_its_deadline(agent):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(agent.socket)
    before = agent.status()["clients_dropped"].get("idle", 0)
    assert s.recv(1) == b""  # the agent closed it (REQUEST_SECONDS)
    s.close()
    assert agent.status()["clients_dropped"].get("idle", 0) == before + 1


def test_a_deleted_namespace_is_not_kept_alive(agent, child_factory):
    """The agent learns a namespace (a socket in it, a snapshot), then the namespace is
    deleted: its veth pair must go at once, as without sockwatch, so that a device of the
    same name can be made again (the agent once held an fd on it until the next reconcile)."""
    name = f"sw-del-{uuid.uuid4().hex[:8]}"
    dev = f"swd{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        inode = os.stat(f"/run/netns/{name}").st_ino
        child = child_factory(name)
        lst = child.do(op="tcp_listen", family=4, addr="127.0.0.1", port=0)
        rows = snapshot("--netns", str(inode), socket=agent.socket)
        assert [r for r in rows if r["cookie"] == lst["cookie"] and r["pid"] == child.pid], rows
        child.stop()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    deadline = time.monotonic() + 3
    while subprocess.run(["ip", "link", "show", dev], capture_output=True, check=False).returncode == 0:
        assert time.monotonic() < deadline, f"{dev} outlived its namespace by 3 s: something holds the namespace"
        time.sleep(0.05)
    subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p"], check=True)
    subprocess.run(["ip", "link", "del", dev], check=True)
    # and a reconcile forgets the namespace and its rows
    agent.status(reconcile=True)
    assert not [r for r in snapshot(socket=agent.socket) if r["cookie"] == lst["cookie"]]


@pytest.mark.slow
def test_time_wait_rows_leave_with_the_kernels(netns, fresh_agent, child_factory):
    """No reconcile runs here (the test agents reconcile hourly): TIME-WAIT rows leave
    when the kernel drops them (60 s), one a query saw in TIME-WAIT (no hook reports its
    end: the agent reads connections again when its time is up) and one made while
    nobody asked (gone from the next read)."""
    a = fresh_agent()
    c = child_factory(netns.name)
    lst = c.do(op="tcp_listen", addr="127.0.0.1", port=7200)
    tws = [c.do(op="tcp_connect", addr="127.0.0.1", port=7200, accept_on=lst["id"]) for _ in range(2)]
    for tw in tws[:1]:
        c.do(op="close", id=tw["id"])
        c.do(op="close", id=tw["accepted"]["id"])
    rows = snapshot("--netns", str(netns.inode), socket=a.socket)
    assert [r["state"] for r in rows if r["cookie"] == tws[0]["cookie"]] == ["TIME-WAIT"]
    c.do(op="close", id=tws[1]["id"])  # this one nobody asks about until it has expired
    c.do(op="close", id=tws[1]["accepted"]["id"])
    time.sleep(63)
    assert (
        "TIME-WAIT"
        not in subprocess.run(
            ["ip", "netns", "exec", netns.name, "ss", "-tan"], capture_output=True, text=True, check=True
        ).stdout
    )
    st = a.status()
    # the one seen in TIME-WAIT counts as expired; the other was last seen established
    assert st["tracker"]["timewait_expired"] == 1 and st["tracker"]["reconciles"] == 0, st["tracker"]
    rows = snapshot("--netns", str(netns.inode), socket=a.socket)
    assert not [r for r in rows if r["state"] == "TIME-WAIT"], rows


def test_sockets_a_sendto_bound_are_read_with_their_owners_and_cost_no_record(netns, fresh_agent, child_factory):
    """3,000 UDP sockets bound by sendto() (no hook sees that, and none runs at a socket's
    creation or close): the next snapshot lists every one with its owner, read from the
    kernel and /proc as ss -p does, and not one record crossed to the agent for them.
    An old configuration's --max-udp still starts the agent (it sizes nothing now)."""
    a = fresh_agent(None, ("--max-udp", "1024"))
    before = a.status()["bpf"]["events"]
    c = child_factory(netns.name)
    made = [c.do(op="udp_sendto", addr="127.0.0.1", port=9) for _ in range(3000)]
    r = subprocess.run(
        sockwatch_cmd("snapshot", "--json", "--netns", str(netns.inode), "--socket", a.socket),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = {row["cookie"]: row for row in json.loads(r.stdout)["sockets"]}
    assert {m["cookie"] for m in made} <= set(rows), len(set(rows))
    assert all(rows[m["cookie"]]["pid"] == c.pid and rows[m["cookie"]]["owner_source"] == "proc" for m in made)
    assert not r.stderr, r.stderr  # nothing partial
    st = a.status()
    assert st["bpf"]["events"] - before < 100 and st["bpf"]["ringbuf_full"] == 0, st["bpf"]
    assert st["tracker"]["kernel_reads"] >= 1 and not st["stream_hooks"], st


def test_an_agent_not_run_by_root_is_not_believed():
    """The CLI's other side of trust (tests/unit/test_client_trust.py): a socket served
    by an unprivileged user is not believed, whatever it answers."""
    assert shutil.which("setpriv")
    top = tempfile.mkdtemp(dir="/var/tmp", prefix="sw-fake-")
    os.chmod(top, 0o777)
    path = os.path.join(top, "a.sock")
    fake = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen(1);print('up',flush=True)\n"
        "c,_=s.accept();c.recv(9999);c.sendall(b'{\"ok\": true}\\n[]')\n"
    )
    proc = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", fake, path],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        r = subprocess.run(sockwatch_cmd("snapshot", "--socket", path), capture_output=True, text=True, check=False)
        assert r.returncode == 4 and "not root" in r.stderr and r.stdout == "", r
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(top)


# How each case fills a private tmpfs at $D before `serve` tries to make its socket there
# (what refuses it: the lock file's open, its one-line write, the socket's bind, mkdir).
NO_INODES = 'i=0; while touch "$D/f$i" 2>/dev/null; do i=$((i+1)); done'
NO_BLOCKS = 'dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null; true'
FULL_DIRS = {
    "read-only": ("-o ro,size=1m", "", "agent.sock"),
    "read-only, a directory to make": ("-o ro,size=1m", "", "sub/agent.sock"),
    "no inodes": ("-o size=1m,nr_inodes=16", NO_INODES, "agent.sock"),
    "no inodes, a directory to make": ("-o size=1m,nr_inodes=16", NO_INODES, "sub/agent.sock"),
    "one inode left": ("-o size=1m,nr_inodes=16", NO_INODES + '; rm "$D/f0"', "agent.sock"),
    "no blocks": ("-o size=64k", NO_BLOCKS, "agent.sock"),
    "no blocks, a directory to make": ("-o size=64k", NO_BLOCKS, "sub/agent.sock"),
}


@pytest.mark.parametrize("case", FULL_DIRS, ids=list(FULL_DIRS))
def test_a_full_or_read_only_socket_directory_is_one_sentence_and_leaves_nothing(tmp_path, case):
    """serve on a filesystem that refuses what it needs: one sentence, exit 4, no
    traceback, and the directory as it was (no lock file, no directory it made). The
    tmpfs lives in a mount namespace of the test's own."""
    opts, fill, rel = FULL_DIRS[case]
    d = tmp_path / "full"
    d.mkdir()
    serve = " ".join(shlex.quote(a) for a in sockwatch_cmd("serve", "--socket", f"{d}/{rel}", "--listen", "off"))
    script = (f'D={shlex.quote(str(d))}; mount -t tmpfs {opts} tmpfs "$D" && {{ {fill or "true"}; }} && '
              f'before=$(ls -A "$D"); {serve}; rc=$?; after=$(ls -A "$D"); '
              'echo "RC=$rc"; [ "$before" = "$after" ] && echo SAME')  # fmt: skip
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert "RC=4" in r.stdout, (r.stdout, r.stderr)
    assert "SAME" in r.stdout, (r.stdout, r.stderr)  # nothing of ours left behind
    assert "Traceback" not in r.stderr and r.stderr.startswith("sockwatch: cannot "), r.stderr


@pytest.mark.parametrize("taken", [True, False], ids=["port-in-use", "address-not-here"])
def test_a_metrics_address_it_cannot_listen_on_names_listen_and_leaves_nothing(scratch, taken):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    where = f"127.0.0.1:{held.getsockname()[1]}" if taken else "192.0.2.1:9847"  # (TEST-NET-1: no host has it)
    path = os.path.join(scratch, "sub", "agent.sock")
    try:
        r = subprocess.run(sockwatch_cmd("serve", "--socket", path, "--listen", where),
                           check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        held.close()
    assert r.returncode == 2, r.stderr
    assert "cannot listen for metrics" in r.stderr and "--listen" in r.stderr and "--socket" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(scratch) == []  # not the directory it made for the socket, nor the lock


def test_a_namespace_inode_nothing_has_is_said_not_an_empty_answer(agent, netns):
    missing = 4026599999
    assert not any(os.stat(f"/proc/{p}/ns/net").st_ino == missing for p in os.listdir("/proc") if p.isdigit()
                   and os.path.exists(f"/proc/{p}/ns/net"))  # fmt: skip
    for args in (("snapshot",), ("ports",), ("snapshot", "--lookups")):
        r = subprocess.run(sockwatch_cmd(*args, "--netns", str(missing), "--socket", agent.socket),
                           capture_output=True, text=True, check=False)  # fmt: skip
        assert r.returncode != 0 and f"no network namespace has inode {missing}" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    # a namespace made just now is found, not refused (the agent looks again first)
    r = subprocess.run(sockwatch_cmd("snapshot", "--json", "--netns", str(netns.inode), "--socket", agent.socket),
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["sockets"] == [], r.stderr


def test_a_symlinked_parent_is_followed_only_if_roots_and_never_into_the_kernels_trees(scratch):
    from sockwatch.agent import sockpath

    victim = os.path.join(scratch, "victim")
    os.mkdir(victim)
    theirs = os.path.join(scratch, "link1")  # a link anyone could have made in /tmp
    os.symlink(victim, theirs)
    os.lchown(theirs, 65534, 65534)
    dangling = os.path.join(scratch, "link2")  # to a directory that does not exist yet
    os.symlink(os.path.join(scratch, "victim2"), dangling)
    os.lchown(dangling, 65534, 65534)
    for path in (f"{theirs}/agent.sock", f"{dangling}/sub/agent.sock"):
        with pytest.raises(sockpath.PathError, match="symlink owned by uid 65534"):
            sockpath.claim(path)
    assert os.listdir(victim) == [] and not os.path.exists(os.path.join(scratch, "victim2"))
    # root's link into the cgroup tree: no cgroup is made through it
    cg = os.path.join(scratch, "cg")
    os.symlink("/sys/fs/cgroup", cg)
    with pytest.raises(sockpath.PathError, match="leads under /sys"):
        sockpath.claim(f"{cg}/sw-made-here/agent.sock")
    assert not os.path.exists("/sys/fs/cgroup/sw-made-here")
    # root's own link to a directory (as /var/run -> /run) is followed
    mine = os.path.join(scratch, "mine")
    os.symlink(victim, mine)
    c = sockpath.claim(f"{mine}/agent.sock")
    try:
        assert stat.S_ISSOCK(os.lstat(os.path.join(victim, "agent.sock")).st_mode)
    finally:
        c.release()
    assert os.listdir(victim) == []
    # and through serve: one sentence, exit 2
    r = serve(f"{theirs}/agent.sock")
    assert r.returncode == 2 and "not followed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_directory_another_user_could_swap_is_refused_and_a_swap_after_the_walk_changes_nothing(scratch):
    """The walk refuses a directory whose owner is not root, or that others may write
    without the sticky bit; and once walked, the directory is held: renaming it away and
    putting someone's file in its place leaves that file alone when the agent goes."""
    from sockwatch.agent import sockpath

    theirs = os.path.join(scratch, "theirs")
    os.mkdir(theirs)
    os.chown(theirs, 65534, 65534)
    open_ = os.path.join(scratch, "open")
    os.mkdir(open_)
    os.chmod(open_, 0o777)
    sticky = os.path.join(scratch, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)  # as /tmp: others may write, not rename what is not theirs
    with pytest.raises(sockpath.PathError, match="owned by uid 65534, not root"):
        sockpath.claim(f"{theirs}/sub/agent.sock")
    with pytest.raises(sockpath.PathError, match="writable by others without the sticky bit"):
        sockpath.claim(f"{open_}/agent.sock")
    assert os.listdir(theirs) == [] and os.listdir(open_) == []
    c = sockpath.claim(f"{sticky}/mine/agent.sock")  # made by the walk, 0700
    try:
        os.rename(os.path.join(sticky, "mine"), os.path.join(sticky, "moved"))
        os.mkdir(os.path.join(sticky, "mine"))
        with open(os.path.join(sticky, "mine", "agent.sock.lock"), "w") as f:
            f.write("someone's\n")
        with open(os.path.join(sticky, "mine", "agent.sock"), "w") as f:
            f.write("precious")
        assert stat.S_ISSOCK(os.lstat(os.path.join(sticky, "moved", "agent.sock")).st_mode)
    finally:
        c.release()
    assert sorted(os.listdir(os.path.join(sticky, "mine"))) == ["agent.sock", "agent.sock.lock"]
    assert open(os.path.join(sticky, "mine", "agent.sock")).read() == "precious"
    assert os.listdir(os.path.join(sticky, "moved")) == []  # ours went from where they really were
