"""Prometheus metrics, built at scrape time from what the tracker holds (no metric is
touched per event): a custom collector with its sources injected as callables, as
prometheus_client's own process collector does, each source in its own try so that
one failing source leaves the others' families (and says so).

Cardinality is capped: info series per listening socket and per worst destination
are limited (top-N), labels whose values grow with the host can be dropped (their
series summed), and `sockwatch_series_capped` says how many series a cap cut. The
whole-table families come from the tracker's tally, which follows the rows that
changed: a scrape costs O(changes since the last one), not O(sockets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sockwatch import ports
from sockwatch.drops import Drops
from sockwatch.lookups import Destination
from sockwatch.metric_limits import Limits
from sockwatch.model import IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, STATE_NAMES, SockRow, fmt_addr
from sockwatch.render import printable_cell
from sockwatch.tally import Tally

log = logging.getLogger(__name__)


@dataclass
class Health:
    """The agent's own state at scrape time."""

    events_lost: dict[str, int] = field(default_factory=dict)  # reason -> total
    kernel_reads: int = 0  # UDP and listener tables read for a query or scrape
    repairs: dict[str, int] = field(default_factory=dict)
    reconciles: int = 0
    last_reconcile_age: float = 0.0
    programs_attached: int = 0
    hooks_missing: int = 0
    cpu_seconds: float = 0.0
    events: int = 0
    version: str = "0"
    revision: str = ""
    tcp_opened: int = 0  # TCP connections the hooks saw opened (counted in the kernel, never sent)
    bpf_programs: dict[str, tuple[int, int]] = field(default_factory=dict)  # hook -> (runs, run ns), while counted
    web_config_reloads: dict[str, int] | None = None  # "ok"/"failed" -> count; None: no web config
    web_config_last_ok: bool = True  # the last time the web config was read again, it loaded


@dataclass
class LookupSample:
    """What the sk_lookup hook counted, read at scrape time."""

    destinations: list[Destination]
    peers: dict[tuple[int, str, str], int]  # (netns, address, port) -> peers counted
    hooked: int = 0
    uncounted: int = 0
    unattributed: int = 0
    peers_evicted: int = 0
    over_cap: int = 0  # namespaces not hooked: --max-lookup-namespaces reached


@dataclass
class DropSample:
    """Each socket's drops, read at scrape time (sockwatch.drops), and the drops the
    hook could not count by reason (its map was full)."""

    sockets: list[tuple[SockRow, Drops]]
    uncounted: int = 0


Family = GaugeMetricFamily | CounterMetricFamily


class _Family:
    """Samples keyed by the labels kept: a dropped label merges series by summing."""

    def __init__(self, kind: type[Family], name: str, doc: str, labels: list[str], drop: frozenset[str]) -> None:
        self.kind, self.name, self.doc = kind, name, doc
        self.keep = [i for i, label in enumerate(labels) if label not in drop]
        self.labels = [labels[i] for i in self.keep]
        self.samples: dict[tuple[str, ...], float] = {}

    def add(self, values: list[str], v: float) -> None:
        key = tuple(printable_cell(values[i]) for i in self.keep)  # (process names: no escape sequences)
        self.samples[key] = self.samples.get(key, 0) + v

    def metric(self) -> Metric:
        m = self.kind(self.name, self.doc, labels=self.labels)
        for key, v in self.samples.items():
            m.add_metric(list(key), v)
        return m


class SockwatchCollector(Collector):
    def __init__(
        self,
        tally: Callable[[], Tally],
        port_ranges: Callable[[], dict[int, ports.PortRange]],
        bind_failures: Callable[[], dict[tuple[int, int, str], int]],
        binds: Callable[[], dict[tuple[int, int], int]],
        health: Callable[[], Health],
        limits: Limits | None = None,
        fix_owners: Callable[[list[SockRow]], object] = lambda rows: None,
        lookups: Callable[[], LookupSample | None] = lambda: None,
        drops: Callable[[], DropSample | None] = lambda: None,
    ) -> None:
        self.lookups = lookups
        self.drops = drops
        self.tally = tally
        self.port_ranges = port_ranges
        self.bind_failures = bind_failures
        self.binds = binds
        self.health = health
        self.limits = limits or Limits()
        self.fix_owners = fix_owners
        self._listeners: tuple[int, list[SockRow]] = (-1, [])  # (tally.listening_version, sorted)

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the data; registering must not call the sources

    def _family(self, kind: type[Family], name: str, doc: str, labels: list[str]) -> _Family:
        return _Family(kind, name, doc, labels, self.limits.drop_labels)

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        errors = GaugeMetricFamily(
            "sockwatch_scrape_source_error", "1 if a source failed in this scrape (its families are missing)",
            labels=["source"],
        )  # fmt: skip
        capped = GaugeMetricFamily(
            "sockwatch_series_capped", "Series a cardinality cap left out of this scrape", labels=["family"]
        )
        for name, build in (
            ("sockets", self._sockets),
            ("binds", self._binds),
            ("ports", self._ports),
            ("health", self._health),
            ("lookups", self._lookups),
            ("drops", self._drops),
        ):
            try:
                yield from list(build(capped))  # whole: a source failing half-way adds nothing
                errors.add_metric([name], 0)
            except Exception:  # a source's failure is reported, not fatal to the scrape
                log.exception("metrics source %s failed", name)
                errors.add_metric([name], 1)
        yield errors
        yield capped
        took = GaugeMetricFamily("sockwatch_scrape_duration_seconds", "How long building this scrape took")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    def _sorted_listeners(self, t: Tally) -> list[SockRow]:
        """The listening sockets in a stable order, sorted again only when they changed."""
        version, rows = self._listeners
        if version != t.listening_version:
            rows = sorted(t.listening.values(), key=lambda r: (r.netns, r.protocol, r.local_port, r.cookie))
            self._listeners = (t.listening_version, rows)
        return rows

    def _sockets(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        t = self.tally()
        socks = self._family(GaugeMetricFamily, "sockwatch_sockets", "Sockets in the kernel's lookup tables",
                             ["netns", "protocol", "family", "state"])  # fmt: skip
        for (netns, proto, fam, state), n in sorted(t.counts.items()):
            socks.add([str(netns), PROTO_NAMES.get(proto, str(proto)), f"ipv{fam}", STATE_NAMES.get(state, "")], n)
        yield socks.metric()
        ranges = self.port_ranges()
        listening = self._sorted_listeners(t)
        shown = listening[: self.limits.listeners]
        self.fix_owners(shown)
        info = self._family(
            GaugeMetricFamily,
            "sockwatch_listener_info",
            "TCP listeners and unconnected UDP sockets: who owns each port, in every namespace (1 per socket)",
            ["netns", "protocol", "address", "port", "port_class", "comm", "container", "pod"],
        )
        default = ports.PortRange(*ports.DEFAULT_RANGE)
        for r in shown:
            c = r.container
            info.add([str(r.netns), r.proto_name, fmt_addr(r.local_address), str(r.local_port),
                      ports.port_class(r.local_port, ranges.get(r.netns, default)), r.comm or "",
                      (c.short or "") if c is not None else "", (c.pod or "") if c is not None else ""], 1)  # fmt: skip
        yield info.metric()
        if len(listening) > len(shown):
            capped.add_metric(["sockwatch_listener_info"], len(listening) - len(shown))
        accepted = t.listener_connections(shown)
        conns = self._family(
            GaugeMetricFamily,
            "sockwatch_listener_connections",
            "Established (not TIME-WAIT) connections accepted on each TCP listener",
            ["netns", "address", "port"],
        )
        for r in shown:
            if accepted.get(r.cookie):
                conns.add([str(r.netns), fmt_addr(r.local_address), str(r.local_port)], accepted[r.cookie])
        yield conns.metric()
        yield from self._queues(shown)

    def _queues(self, shown: list[SockRow]) -> Iterator[Metric]:
        """What fills before a socket drops, as read for this scrape (sock_diag): each
        listener's accept queue and its backlog, each UDP socket's receive memory and
        SO_RCVBUF (the same listeners as sockwatch_listener_info)."""
        labels = ["netns", "address", "port"]
        fams = [self._family(GaugeMetricFamily, name, doc, labels) for name, doc in (
            ("sockwatch_listen_queue_length", "Connections waiting in each TCP listener's accept queue"),
            ("sockwatch_listen_queue_limit", "Each TCP listener's accept queue limit (its listen() backlog, capped "
                                             "by net.core.somaxconn)"),
            ("sockwatch_udp_receive_memory_bytes", "Memory queued to each unconnected UDP socket, as the kernel "
                                                   "charges it against the buffer (ss -m's r)"),
            ("sockwatch_udp_receive_buffer_bytes", "Each unconnected UDP socket's receive buffer (SO_RCVBUF, ss -m's "
                                                   "rb): a datagram that would pass it is dropped"),
        )]  # fmt: skip
        for r in shown:
            where = [str(r.netns), fmt_addr(r.local_address), str(r.local_port)]
            if r.protocol == IPPROTO_TCP and r.recv_q is not None and r.send_q is not None:
                fams[0].add(where, r.recv_q)
                fams[1].add(where, r.send_q)
            elif r.protocol == IPPROTO_UDP and r.rmem is not None and r.rmem >= 0 and r.rcvbuf is not None:
                fams[2].add(where, r.rmem)
                fams[3].add(where, r.rcvbuf)
        for fam in fams:
            yield fam.metric()

    def _binds(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        ok = self._family(CounterMetricFamily, "sockwatch_binds",
                          "Successful bind() calls, by protocol and the port asked for (0: the kernel chose; "
                          "other: past the cap on ports)", ["protocol", "port"])  # fmt: skip
        for (proto, port), n in sorted(self.binds().items()):
            ok.add([PROTO_NAMES.get(proto, str(proto)), _port(port)], n)
        yield ok.metric()
        failed = self._family(CounterMetricFamily, "sockwatch_bind_failures",
                              "Failed bind() calls, by protocol, port asked for and errno",
                              ["protocol", "port", "errno"])  # fmt: skip
        for (proto, port, err), n in sorted(self.bind_failures().items()):
            failed.add([PROTO_NAMES.get(proto, str(proto)), _port(port), err], n)
        yield failed.metric()

    def _ports(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        t, ranges = self.tally(), self.port_ranges()
        ns = GaugeMetricFamily(
            "sockwatch_ephemeral_ports_used_ratio",
            "Ephemeral ports in use in each namespace over what its range leaves after reserved ports",
            labels=["netns"],
        )
        for n in t.namespace_summary(ranges):
            ns.add_metric([str(n["netns"])], n["in_use"] / n["available"] if n["available"] else 1.0)
        yield ns
        worst = t.pressure(ranges)
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

    def _top(self, fam: _Family, capped: GaugeMetricFamily, items: list[tuple[list[str], float]],
             other: Callable[[list[str]], list[str]]) -> Metric:  # fmt: skip
        """The limit's worth of items, largest first; the rest summed under other(labels)."""
        items.sort(key=lambda it: -it[1])
        for labels, v in items[: self.limits.lookups]:
            fam.add(labels, v)
        for labels, v in items[self.limits.lookups :]:
            fam.add(other(labels), v)
        if len(items) > self.limits.lookups:
            capped.add_metric([fam.name], len(items) - self.limits.lookups)
        return fam.metric()

    def _lookups(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        got = self.lookups()
        if got is None:
            return  # no sk_lookup hook: sockwatch_hooks_missing says so
        looked = self._family(CounterMetricFamily, "sockwatch_socket_lookups",
                              "Socket lookups the kernel made for arriving packets, by destination (TCP: new "
                              "connections; UDP: datagrams to unconnected sockets)",
                              ["netns", "protocol", "address", "port"])  # fmt: skip
        items = [([str(d.netns), PROTO_NAMES.get(d.protocol, str(d.protocol)), fmt_addr(d.address), str(d.port)],
                  float(d.lookups)) for d in got.destinations]  # fmt: skip
        yield self._top(looked, capped, items, lambda lb: [lb[0], lb[1], "other", "other"])
        misses: dict[tuple[str, str, str], float] = {}
        for d in got.destinations:
            if d.misses:
                k = (str(d.netns), PROTO_NAMES.get(d.protocol, str(d.protocol)), str(d.port))
                misses[k] = misses.get(k, 0) + d.misses
        missed = self._family(CounterMetricFamily, "sockwatch_socket_lookup_misses",
                              "Lookups that found no socket (answered with RST or ICMP port unreachable), by "
                              "port: closed ports being probed", ["netns", "protocol", "port"])  # fmt: skip
        yield self._top(missed, capped, [(list(k), v) for k, v in misses.items()], lambda lb: [lb[0], lb[1], "other"])
        peers = self._family(GaugeMetricFamily, "sockwatch_udp_peers",
                             "Remote peers seen sending to each unconnected UDP destination (kept: see "
                             "sockwatch_udp_peers_evicted)", ["netns", "address", "port"])  # fmt: skip
        yield self._top(peers, capped, [([str(k[0]), k[1], k[2]], float(n)) for k, n in got.peers.items()],
                        lambda lb: [lb[0], "other", "other"])  # fmt: skip
        yield _gauge("sockwatch_lookup_namespaces_hooked", "Network namespaces with sockwatch's sk_lookup hook",
                     got.hooked)  # fmt: skip
        yield _gauge("sockwatch_lookup_namespaces_over_cap",
                     "Network namespaces without the sk_lookup hook because --max-lookup-namespaces was reached "
                     "(their sockets are in the table; their lookups are not counted)", got.over_cap)  # fmt: skip
        for name, doc, v in (
            ("sockwatch_socket_lookups_uncounted", "Lookups not counted: the counter map was full", got.uncounted),
            ("sockwatch_socket_lookup_misses_unattributed",
             "Drops for no socket with no lookup of ours before them (a namespace not hooked yet)", got.unattributed),
            ("sockwatch_udp_peers_evicted", "UDP peers evicted from the peer map, least recently seen first",
             got.peers_evicted),
        ):  # fmt: skip
            c = CounterMetricFamily(name, doc)
            c.add_metric([], v)
            yield c

    def _drops(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        got = self.drops()
        if got is None:
            return
        fam = self._family(CounterMetricFamily, "sockwatch_socket_drops",
                           "Packets a socket was handed and dropped, by the kernel's drop reason (TCP_LISTEN_OVERFLOW, "
                           "SOCKET_RCVBUFF, SOCKET_BACKLOG, SOCKET_FILTER, PROTO_MEM, NOT_SPECIFIED) since sockwatch "
                           "watched the socket", ["netns", "protocol", "address", "port", "reason"])  # fmt: skip
        items = [([str(r.netns), r.proto_name, fmt_addr(r.local_address), str(r.local_port), reason], float(n))
                 for r, d in got.sockets for reason, n in d.reasons.items()]  # fmt: skip
        yield self._top(fam, capped, items, lambda lb: [lb[0], lb[1], "other", "other", lb[4]])
        c = CounterMetricFamily("sockwatch_socket_drops_uncounted",
                                "Drops not counted by socket and reason: the drop map was full")  # fmt: skip
        c.add_metric([], got.uncounted)
        yield c

    def _health(self, capped: GaugeMetricFamily) -> Iterator[Metric]:
        h = self.health()
        lost = CounterMetricFamily("sockwatch_events_lost", "Hook records lost, by where", labels=["reason"])
        for reason, n in sorted(h.events_lost.items()):
            lost.add_metric([reason], n)
        yield lost
        reads = CounterMetricFamily("sockwatch_kernel_reads", "UDP and listener tables read from the kernel for a "
                                    "query or scrape (no hook runs at every socket's close)")  # fmt: skip
        reads.add_metric([], h.kernel_reads)
        yield reads
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
        opened = CounterMetricFamily("sockwatch_tcp_connections_opened",
                                     "TCP connections the hooks saw opened (connect and accept)")  # fmt: skip
        opened.add_metric([], h.tcp_opened)
        yield opened
        if h.web_config_reloads is not None:
            reloads = CounterMetricFamily("sockwatch_web_config_reloads", "Times the web config was read again "
                                          "(its files changed, or SIGHUP), by result", labels=["result"])  # fmt: skip
            for result in ("ok", "failed"):
                reloads.add_metric([result], h.web_config_reloads.get(result, 0))
            yield reloads
            yield _gauge("sockwatch_web_config_last_reload_successful", "Whether the web config last read again "
                         "loaded (0: the one before stays in use)", int(h.web_config_last_ok))  # fmt: skip
        counted = "counted by the kernel only while BPF stats are on (kernel.bpf_stats_enabled, or status --bpf-stats)"
        runs = CounterMetricFamily("sockwatch_bpf_program_runs", f"Runs of each hook's BPF programs, {counted}",
                                   labels=["hook"])  # fmt: skip
        run_s = CounterMetricFamily("sockwatch_bpf_program_run_seconds", f"Time in each hook's BPF programs, {counted}",
                                    labels=["hook"])  # fmt: skip
        for hook, (n, ns) in sorted(h.bpf_programs.items()):
            runs.add_metric([hook], n)
            run_s.add_metric([hook], ns / 1e9)
        yield runs
        yield run_s
        build = GaugeMetricFamily("sockwatch_build_info", "sockwatch's version, and the git revision it was run "
                                  "from (empty when installed)", labels=["version", "revision"])  # fmt: skip
        build.add_metric([h.version, h.revision], 1)
        yield build


def _port(port: int) -> str:
    return "other" if port < 0 else str(port)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
