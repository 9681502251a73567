"""The owner rule against ss -p: the process holding the socket's file, by its process
name; none for a socket with no file. Cases where the creator is no longer the holder,
or its name is not the process name, each compared with ss in the test's namespace."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.kernel.conftest import compare_with_ss, snapshot

FORK_AND_EXIT = """
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 7301)); s.listen()
if os.fork() == 0:
    os.write(1, b"%d\\n" % os.getpid()); sys.stdin.read(); os._exit(0)
os._exit(0)
"""

# A socketpair (a, b) and a forked receiver that takes one fd over it, says its pid, and
# holds it until stdin closes.
RECEIVER = """
import array, os, socket, sys, time
a, b = socket.socketpair()
if os.fork() == 0:  # the receiver
    a.close()
    msg, anc, _, _ = b.recvmsg(1, socket.CMSG_LEN(4))
    fds = array.array("i"); fds.frombytes(anc[0][2][:4])
    kept = socket.socket(fileno=fds[0])
    os.write(1, b"receiver %d\\n" % os.getpid()); sys.stdin.read(); os._exit(0)
"""

PASS_AND_CLOSE = (
    RECEIVER
    + """
s = socket.socket(); s.bind(("127.0.0.1", 7302)); s.listen()
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
s.close()
os.write(1, b"sender %d\\n" % os.getpid()); sys.stdin.read()
"""
)

RENAMED = """
import ctypes, os, socket, sys, threading
libc = ctypes.CDLL(None)
def in_thread():
    libc.prctl(15, b"sw-worker", 0, 0, 0)  # PR_SET_NAME: this thread's name only
    global t; t = socket.socket(); t.bind(("127.0.0.1", 7303)); t.listen()
th = threading.Thread(target=in_thread); th.start(); th.join()
s = socket.socket(); s.bind(("127.0.0.1", 7304)); s.listen()
libc.prctl(15, b"sw-renamed", 0, 0, 0)  # the process (main thread) renamed after
os.write(1, b"%d\\n" % os.getpid()); sys.stdin.read()
"""


# Each helper says its pid with one write(2): two processes share the pipe, and print()
# may write a line in pieces (PYTHONUNBUFFERED), which then interleave.


def stop(procs: list[subprocess.Popen]) -> None:
    """Close every helper's stdin (even an exited one's: its forked children read the same
    pipe), then wait for each, killing what does not end."""
    for p in procs:
        if p.stdin:
            p.stdin.close()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_in(netns, code: str) -> subprocess.Popen:
    """A Python process of the test's in its namespace; it exits when its stdin closes."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_owners_follow_the_file_and_the_process_name(netns, agent):
    procs = []
    try:
        fork = run_in(netns, FORK_AND_EXIT)
        procs.append(fork)
        assert fork.stdout is not None
        heir = int(fork.stdout.readline())
        fork.wait(10)  # the creator has exited; its child holds the listener
        passer = run_in(netns, PASS_AND_CLOSE)
        procs.append(passer)
        assert passer.stdout is not None
        said = dict(passer.stdout.readline().split() for _ in range(2))  # in either order
        receiver, sender = int(said["receiver"]), int(said["sender"])
        renamed = run_in(netns, RENAMED)
        procs.append(renamed)
        assert renamed.stdout is not None
        named = int(renamed.stdout.readline())

        # a sender that lives on is found out by the reconcile (it reads owners' fd tables)
        agent.status(reconcile=True)
        rows = compare_with_ss(netns, agent.socket)
        by_port = {r["local_port"]: r for r in rows}
        assert by_port[7301]["pid"] == heir
        assert by_port[7302]["pid"] == receiver != sender
        assert by_port[7303]["pid"] == by_port[7304]["pid"] == named
        assert by_port[7303]["comm"] == by_port[7304]["comm"] == "sw-renamed"
    finally:
        stop(procs)
    # the forked heir (not our child) exits when its stdin closes: then no listener is left
    deadline = time.monotonic() + 5
    while [r for r in snapshot("--netns", str(netns.inode), socket=agent.socket) if r["state"] == "LISTEN"]:
        assert time.monotonic() < deadline, "a listener outlived every process of the test"
        time.sleep(0.1)


# The sender exits at once after passing its listener: the receiver is its only holder.
PASS_AND_EXIT = (
    RECEIVER
    + """
s = socket.socket(); s.bind(("127.0.0.1", PORT)); s.listen()
os.write(1, b"sender %d\\n" % os.getpid()); sys.stdin.readline()
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
os._exit(0)
"""
)


def test_a_passed_socket_whose_sender_exits_shows_its_receiver_at_the_next_view(netns, agent):
    """ss -p names the receiver as soon as the sender is gone; so does the next view, even
    right after another view's /proc scan (no waiting for the reconcile)."""
    procs = []
    try:
        for port in (7311, 7312):  # twice in a row: the second comes within any scan interval
            p = run_in(netns, PASS_AND_EXIT.replace("PORT", str(port)))
            procs.append(p)
            assert p.stdin is not None and p.stdout is not None
            sender = int(p.stdout.readline().split()[1])
            rows = snapshot("--netns", str(netns.inode), socket=agent.socket)  # the sender owns it now
            assert {r["local_port"]: r["pid"] for r in rows}.get(port) == sender
            p.stdin.write("go\n")
            p.stdin.flush()
            receiver = int(p.stdout.readline().split()[1])
            p.wait(10)  # the sender has exited
            by_port = {r["local_port"]: r for r in compare_with_ss(netns, agent.socket)}
            assert by_port[port]["pid"] == receiver, by_port[port]
    finally:
        stop(procs)
