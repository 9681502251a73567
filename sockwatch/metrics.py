"""Prometheus metrics, built at scrape time from what the tracker holds (no metric is
touched per event): a custom collector with its sources injected as callables, as
prometheus_client's own process collector does, each source in its own try so that
one failing source leaves the others' families (and says so).

Cardinality is capped: info series per listening socket and per worst destination
are limited (top-N), and `sockwatch_series_capped` says how many a cap cut.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sockwatch import ports
from sockwatch.model import IPPROTO_UDP, PROTO_NAMES, STATE_NAMES, SockRow, TcpState, fmt_addr, wildcard

log = logging.getLogger(__name__)

DEFAULT_PORT = 9847  # sockwatch's own default, documented in the README
MAX_LISTENERS = 2000  # sockwatch_listener_info series
MAX_DESTINATIONS = 20  # sockwatch_ephemeral_destination_used_ratio series
STALE_SECONDS = 5.0  # whole-table families may be this old while the table changes


@dataclass
class Limits:
    listeners: int = MAX_LISTENERS
    destinations: int = MAX_DESTINATIONS


@dataclass
class Health:
    """The agent's own state at scrape time."""

    events_lost: dict[str, int] = field(default_factory=dict)  # reason -> total
    udp_map_entries: int = 0
    udp_map_capacity: int = 1
    repairs: dict[str, int] = field(default_factory=dict)
    reconciles: int = 0
    last_reconcile_age: float = 0.0
    programs_attached: int = 0
    hooks_missing: int = 0
    cpu_seconds: float = 0.0
    events: int = 0
    version: str = "0"


class SockwatchCollector(Collector):
    def __init__(
        self,
        rows: Callable[[], list[SockRow]],
        port_ranges: Callable[[], dict[int, ports.PortRange]],
        bind_failures: Callable[[], dict[tuple[int, int, str], int]],
        binds: Callable[[], dict[int, int]],
        health: Callable[[], Health],
        limits: Limits | None = None,
        version: Callable[[], int] = lambda: -1,
    ) -> None:
        self.rows = rows
        self.port_ranges = port_ranges
        self.bind_failures = bind_failures
        self.binds = binds
        self.health = health
        self.limits = limits or Limits()
        self.version = version
        # whole-table families, rebuilt off the scrape path (refresh) when the table has
        # changed, at most every STALE_SECONDS: a pass over 100,000 rows is too dear for a scrape
        self._cache: dict[str, tuple[int, float, list[Metric], list[tuple[str, float]]]] = {}
        self._builders: dict[str, Callable] = {}  # the whole-table sources a scrape has asked for

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the data; registering must not call the sources

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        errors = GaugeMetricFamily(
            "sockwatch_scrape_source_error", "1 if a source failed in this scrape (its families are missing)",
            labels=["source"],
        )  # fmt: skip
        capped = GaugeMetricFamily(
            "sockwatch_series_capped", "Series a cardinality cap left out of this scrape", labels=["family"]
        )
        for name, build, whole_table in (
            ("sockets", self._sockets, True),
            ("binds", self._binds, False),
            ("ports", self._ports, True),
            ("health", self._health, False),
        ):
            try:
                yield from self._cached(name, build, capped) if whole_table else build(capped)
                errors.add_metric([name], 0)
            except Exception:  # a source's failure is reported, not fatal to the scrape
                log.exception("metrics source %s failed", name)
                errors.add_metric([name], 1)
        yield errors
        yield capped
        took = GaugeMetricFamily("sockwatch_scrape_duration_seconds", "How long building this scrape took")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    def _cached(self, name: str, build: Callable, capped: GaugeMetricFamily) -> list[Metric]:
        """A whole-table source's families: built on the first scrape; after that a
        scrape serves what was built, and `refresh()` (the agent's tick, off the scrape
        path) rebuilds them when the table has changed and they are STALE_SECONDS old."""
        hit = self._cache.get(name)
        if hit is None:
            self._build(name, build)
            hit = self._cache[name]
        self._builders[name] = build
        for family, n in hit[3]:
            capped.add_metric([family], n)
        return hit[2]

    def _build(self, name: str, build: Callable) -> None:
        cut = GaugeMetricFamily("cut", "", labels=["family"])
        families = list(build(cut))
        self._cache[name] = (self.version(), time.monotonic(), families, [(s.labels["family"], s.value)
                                                                          for s in cut.samples])  # fmt: skip

    def refresh(self) -> int:
        """Rebuild the whole-table families that are out of date (the table changed and
        they are STALE_SECONDS old). Returns how many were rebuilt."""
        version, now, done = self.version(), time.monotonic(), 0
        for name, build in list(self._builders.items()):
            cached = self._cache.get(name)
            if cached is not None and (cached[0] == version or now - cached[1] < STALE_SECONDS):
                continue
            try:
                self._build(name, build)
                done += 1
            except Exception:  # reported at the next scrape, which rebuilds it there
                log.exception("metrics source %s failed", name)
                self._cache.pop(name, None)
        return done

    def _sockets(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        rows = self.rows()
        by = Counter(map(attrgetter("netns", "protocol", "family", "state"), rows))  # C-level, no call per row
        socks = GaugeMetricFamily(
            "sockwatch_sockets", "Sockets in the kernel's lookup tables",
            labels=["netns", "protocol", "family", "state"],
        )  # fmt: skip
        for (netns, proto, fam, state), n in sorted(by.items()):
            labels = [str(netns), PROTO_NAMES.get(proto, str(proto)), f"ipv{fam}", STATE_NAMES.get(state, "")]
            socks.add_metric(labels, n)
        yield socks
        ranges = self.port_ranges()
        listening = [
            r for r in rows if (r.protocol == IPPROTO_UDP and not r.is_connection) or r.state == TcpState.LISTEN
        ]
        listening.sort(key=lambda r: (r.netns, r.protocol, r.local_port, r.cookie))
        info = GaugeMetricFamily(
            "sockwatch_listener_info",
            "One series per TCP listener and unconnected UDP socket: who owns each port, in every namespace",
            labels=["netns", "protocol", "address", "port", "port_class", "comm"],
        )
        default = ports.PortRange(*ports.DEFAULT_RANGE)
        for r in listening[: self.limits.listeners]:
            cls = ports.port_class(r.local_port, ranges.get(r.netns, default))
            info.add_metric(
                [str(r.netns), r.proto_name, fmt_addr(r.local_address), str(r.local_port), cls, r.comm or ""], 1
            )
        yield info
        if len(listening) > self.limits.listeners:
            capped.add_metric(["sockwatch_listener_info"], len(listening) - self.limits.listeners)
        per: Counter[tuple] = Counter()
        keys = {(r.netns, r.family, r.local_address, r.local_port) for r in listening if r.state == TcpState.LISTEN}
        for r in rows:
            if r.protocol != IPPROTO_UDP and r.is_connection and r.state != TcpState.TIME_WAIT:
                # the listener that accepted it: its exact address, else the wildcard (a v6 one takes v4 too)
                for key in (
                    (r.netns, r.family, r.local_address, r.local_port),
                    (r.netns, r.family, wildcard(r.family), r.local_port),
                    (r.netns, 6, wildcard(6), r.local_port),
                ):
                    if key in keys:
                        per[key] += 1
                        break
        conns = GaugeMetricFamily(
            "sockwatch_listener_connections", "Established (not TIME-WAIT) connections accepted on each TCP listener",
            labels=["netns", "address", "port"],
        )  # fmt: skip
        for (netns, _fam, addr, port), n in sorted(per.items(), key=lambda kv: -kv[1])[: self.limits.listeners]:
            conns.add_metric([str(netns), fmt_addr(addr), str(port)], n)
        yield conns

    def _binds(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        ok = CounterMetricFamily("sockwatch_binds", "Successful bind() calls seen, by protocol", labels=["protocol"])
        for proto, n in sorted(self.binds().items()):
            ok.add_metric([PROTO_NAMES.get(proto, str(proto))], n)
        yield ok
        failed = CounterMetricFamily(
            "sockwatch_bind_failures", "Failed bind() calls, by protocol, port asked for and errno",
            labels=["protocol", "port", "errno"],
        )  # fmt: skip
        for (proto, port, err), n in sorted(self.bind_failures().items()):
            failed.add_metric([PROTO_NAMES.get(proto, str(proto)), str(port), err], n)
        yield failed

    def _ports(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        rows, ranges = self.rows(), self.port_ranges()
        ns = GaugeMetricFamily(
            "sockwatch_ephemeral_ports_used_ratio",
            "Ephemeral ports in use in each namespace over what its range leaves after reserved ports",
            labels=["netns"],
        )
        for n in ports.namespace_summary(rows, ranges):
            ns.add_metric([str(n["netns"])], n["in_use"] / n["available"] if n["available"] else 1.0)
        yield ns
        worst = ports.pressure(rows, ranges)
        dest = GaugeMetricFamily(
            "sockwatch_ephemeral_destination_used_ratio",
            "Ephemeral ports used toward the worst destinations (TCP) or local addresses (UDP); 1 means the next "
            "connect() there fails with EADDRNOTAVAIL",
            labels=["netns", "protocol", "local_address", "remote_address", "remote_port"],
        )
        for p in worst[: self.limits.destinations]:
            dest.add_metric(
                [str(p["netns"]), p["protocol"], p["local_address"], p["remote_address"] or "",
                 str(p["remote_port"] or "")], p["ratio"],
            )  # fmt: skip
        yield dest
        if len(worst) > self.limits.destinations:
            capped.add_metric(["sockwatch_ephemeral_destination_used_ratio"], len(worst) - self.limits.destinations)

    def _health(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        h = self.health()
        lost = CounterMetricFamily("sockwatch_events_lost", "Hook records lost, by where", labels=["reason"])
        for reason, n in sorted(h.events_lost.items()):
            lost.add_metric([reason], n)
        yield lost
        yield _gauge("sockwatch_udp_owner_map_fill_ratio", "UDP owner map entries over its capacity",
                     h.udp_map_entries / max(1, h.udp_map_capacity))  # fmt: skip
        repairs = CounterMetricFamily(
            "sockwatch_reconcile_repairs", "Rows a reconcile repaired, by kind", labels=["kind"]
        )
        for kind in ("added", "changed", "removed"):
            repairs.add_metric([kind], h.repairs.get(kind, 0))
        yield repairs
        rec = CounterMetricFamily("sockwatch_reconciles", "Full comparisons with the kernel's tables")
        rec.add_metric([], h.reconciles)
        yield rec
        yield _gauge("sockwatch_last_reconcile_age_seconds", "Seconds since the last full comparison",
                     h.last_reconcile_age)  # fmt: skip
        yield _gauge("sockwatch_programs_attached", "BPF programs attached by link", h.programs_attached)
        yield _gauge("sockwatch_hooks_missing", "Hooks this kernel refused (degraded)", h.hooks_missing)
        cpu = CounterMetricFamily("sockwatch_agent_cpu_seconds", "CPU time the agent has used")
        cpu.add_metric([], h.cpu_seconds)
        yield cpu
        events = CounterMetricFamily("sockwatch_events", "Hook records read from the ring")
        events.add_metric([], h.events)
        yield events
        build = GaugeMetricFamily("sockwatch_build_info", "sockwatch's version", labels=["version"])
        build.add_metric([h.version], 1)
        yield build


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
