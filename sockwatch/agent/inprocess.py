"""An agent for the lifetime of one front end (`live`, `events`) when none runs: the
same code as `sockwatch serve`, in a thread of this process, answering on a socket in
a private directory of its own. Everything it attached goes when the front end exits,
however it exits (the links belong to this process)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading

from sockwatch.agent import client
from sockwatch.agent.protocol import DEFAULT_SOCKET


class InProcessAgent:
    def __init__(self) -> None:
        from sockwatch.agent.loop import Agent, Settings

        self.dir = tempfile.mkdtemp(prefix="sockwatch-", dir="/run" if os.path.isdir("/run") else None)
        self.socket = os.path.join(self.dir, "agent.sock")
        self.agent = Agent(Settings(self.socket, listen=None))  # metrics are the long-running agent's
        self.thread: threading.Thread | None = None
        try:
            self.agent.start()
        except BaseException:
            self.close()
            raise
        self.thread = threading.Thread(target=self.agent.run, name="sockwatch-agent", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.agent.stop()
        if self.thread is not None:
            self.thread.join(5)
        self.agent.close()
        shutil.rmtree(self.dir, ignore_errors=True)  # ours: made by mkdtemp above


def agent_running(path: str | None) -> bool:
    """True if an agent answers at `path` (or the default path)."""
    if path is not None:  # an explicit path must be an agent's: AgentError says what it is instead
        s = client._connect(path)
        if s is not None:
            s.close()
        return True
    with contextlib.suppress(client.AgentError):
        s = client._connect(None)
        if s is not None:
            s.close()
            return True
    return False


@contextlib.contextmanager
def agent_socket(path: str | None):  # type: ignore[no-untyped-def]
    """(socket path to ask, 'agent' or 'in-process'): the running agent's, or one
    started here for as long as the block runs."""
    if agent_running(path):
        yield (path or DEFAULT_SOCKET), "agent"
        return
    from sockwatch.kernel import prereq

    prereq.require()
    local = InProcessAgent()
    try:
        yield local.socket, "in-process"
    finally:
        local.close()
