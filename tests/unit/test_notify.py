"""systemd's notifications, as sd_notify(3) sends them: one datagram to $NOTIFY_SOCKET
(a path, or an abstract name after "@"), nothing where no one listens."""

from __future__ import annotations

import os
import socket
import uuid

from sockwatch.agent.notify import Notifier


def test_a_state_reaches_the_socket_systemd_gave(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert Notifier({"NOTIFY_SOCKET": path}).send("READY=1\nSTATUS=serving")
        assert s.recv(4096) == b"READY=1\nSTATUS=serving"
    name = f"sw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("WATCHDOG=1")
        assert s.recv(4096) == b"WATCHDOG=1"


def test_nothing_is_sent_where_no_one_listens(tmp_path):
    assert not Notifier({}).send("READY=1")
    assert not Notifier({"NOTIFY_SOCKET": "relative"}).send("READY=1")
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).send("READY=1")


def test_the_watchdog_interval_is_half_the_units_and_ours_alone():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog is None  # another process's
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog is None
    assert Notifier({}).watchdog is None
