"""The exporter's defaults and caps, apart from the collector: `serve`'s options name
them, and importing prometheus_client for a default would slow every command's start."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 9847  # sockwatch's own default, documented in the README
MAX_LISTENERS = 2000  # sockwatch_listener_info series
MAX_DESTINATIONS = 20  # sockwatch_ephemeral_destination_used_ratio series
MAX_LOOKUPS = 500  # series of each socket-lookup family (the rest are summed as "other")
# Labels a configuration may drop (their series are then summed, as `sum without (...)`
# would): the ones whose values grow with the host. Ratios keep theirs (a sum of ratios
# means nothing); top-N caps them instead.
DROPPABLE = frozenset({"netns", "address", "port", "port_class", "comm", "container", "pod", "errno", "family",
                       "state"})  # fmt: skip


@dataclass
class Limits:
    listeners: int = MAX_LISTENERS
    destinations: int = MAX_DESTINATIONS
    lookups: int = MAX_LOOKUPS
    drop_labels: frozenset[str] = frozenset()
