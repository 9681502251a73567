"""Tracker: the table with everything that changes it (see the package's rooms)."""

from __future__ import annotations

from sockwatch.table.hook_events import HookEvents
from sockwatch.table.kernel_sync import KernelSync


class Tracker(HookEvents, KernelSync):
    """The one owner of the socket table: rows come in from the hooks (HookEvents) and
    from the kernel's own tables (KernelSync), owners by the owner rule (Owners), and
    views read them through the Store."""
