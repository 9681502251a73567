"""systemd's service notifications (sd_notify(3)): READY=1 once the hooks are attached,
WATCHDOG=1 while the loop turns, RELOADING=1 around a SIGHUP's reload, STOPPING=1 at
the end. One datagram each to $NOTIFY_SOCKET; nothing where no one listens (not under
systemd, or Type=simple). Written here rather than taken from python3-systemd: the
protocol is one sendto(), and the agent's image need not carry libsystemd's bindings."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path  # "@": an abstract socket
        self.watchdog: float | None = None  # seconds between WATCHDOG=1, half the unit's WatchdogSec
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 2e6

    def send(self, state: str) -> bool:
        """Tell systemd `state` (e.g. "READY=1"); False if no one listens or it failed."""
        if not self.address or (not self.address.startswith("\0") and not self.address.startswith("/")):
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.sendto(state.encode(), self.address)
            return True
        except OSError:
            return False
        finally:
            s.close()
