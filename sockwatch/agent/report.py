"""What the agent says about itself: `status`, the health the metrics carry, what an
answer may lack (`partial`), and its own cost (CPU, memory, the hooks' runs)."""

from __future__ import annotations

import os
import resource
import time
from collections import deque
from typing import TYPE_CHECKING

from sockwatch import __version__, metrics, revision
from sockwatch.kernel import bpfstats, syscalls
from sockwatch.kernel.links import Links

if TYPE_CHECKING:
    from sockwatch.agent.loop import Agent

LOSS_MEMORY_SECONDS = 60.0  # how long answers mention a repaired loss


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """RSS split as the kernel counts it: our heap (anon), mapped files (libbcc, LLVM),
    shared memory (the ring buffer's pages, mapped twice)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, kb, _ = line.split()
                parts[name[3:-1].lower()] = int(kb) * 1024
    return parts


def give_back_memory() -> None:
    """Return freed heap to the kernel (compiling with bcc/LLVM frees ~40 MiB that glibc
    would otherwise keep)."""
    syscalls.malloc_trim()


class CostWindow:
    """The agent's own cost over the last minute, from one sample a second."""

    def __init__(self, seconds: int = 60) -> None:
        self.samples: deque[tuple[float, int, float]] = deque(maxlen=seconds + 1)
        self.sample(0, cpu_seconds())

    def sample(self, events: int, cpu: float) -> None:
        self.samples.append((time.monotonic(), events, cpu))

    def last_minute(self, events: int, cpu: float) -> dict:
        t0, e0, c0 = self.samples[0]
        span = time.monotonic() - t0
        if span <= 0:
            return {"seconds": 0.0, "cpu_percent": 0.0, "events_per_second": 0.0}
        return {
            "seconds": round(span, 1),
            "cpu_percent": round(100 * (cpu - c0) / span, 2),
            "events_per_second": round((events - e0) / span, 1),
        }


class HookRuns:
    """Each hook's runs and run time. The kernel's counts move only while it counts
    (`window`, opened by `status --bpf-stats`, or kernel.bpf_stats_enabled): they are
    read (three syscalls a program, one program per hooked namespace for sk_lookup)
    then, and once after, not at every status and scrape."""

    def __init__(self) -> None:
        self.window = bpfstats.StatsWindow()
        self._runs: dict[str, bpfstats.Runs] | None = None
        self.counting = False  # the kernel was counting at the last read

    def read(self, links: Links) -> dict[str, bpfstats.Runs]:
        counting = self.window.active or bpfstats.kernel_counting()
        if self._runs is None or counting or self.counting:
            self._runs = bpfstats.by_hook(links)
        self.counting = counting
        return self._runs


def health(a: Agent) -> metrics.Health:
    assert a.loaded is not None
    c = a.last_counters or a.loaded.counters()
    t = a.tracker.stats
    return metrics.Health(
        events_lost={
            "ring": c.get("ringbuf_full", 0),
            "stream": a.publisher.skipped_total,
        },
        kernel_reads=t.kernel_reads,
        repairs=dict(t.repairs),
        reconciles=t.reconciles,
        last_reconcile_age=time.monotonic() - t.last_reconcile_at,
        programs_attached=len(a.loaded.links),
        hooks_missing=len(a.loaded.missing),
        cpu_seconds=cpu_seconds(),
        events=t.events.total(),
        version=__version__,
        revision=revision(),
        tcp_opened=c.get("tcp_opened", 0),
        bpf_programs={what: (r.runs, r.run_ns) for what, r in a.hook_runs.read(a.loaded.links).items()},
        web_config_reloads=dict(a.web.reloads) if a.web is not None else None,
        web_config_last_ok=a.web.last_ok if a.web is not None else True,
    )


def partial(a: Agent) -> list[str]:
    """What the table may lack or has just had repaired. Losses are repaired before any
    answer (a resync from the kernel, owners from /proc), so this says what happened in
    the last minute and what to change, rather than what is missing."""
    now = time.monotonic()
    why = []
    if a.loaded is not None and a.loaded.missing:
        why.append(a.loaded.degraded())
    ring = sum(r for t, r in a.recent_losses if now - t < LOSS_MEMORY_SECONDS)
    if ring:
        why.append(f"{ring} events did not fit the ring in the last minute: resynced from the kernel "
                   "(raise --ringbuf-pages)")  # fmt: skip
    if a.tracker.stats.unknown_netns:
        why.append(f"{a.tracker.stats.unknown_netns} events came from namespaces gone before they were read")
    c = a.last_counters
    if c.get("lookup_full"):
        why.append(f"{c['lookup_full']} socket lookups found the counter map full (--max-lookup-keys "
                   f"{a.settings.max_lookup_keys}) and were not counted")  # fmt: skip
    hook = a.loaded.lookup if a.loaded is not None else None
    if hook is not None and not hook.drop_sites_checked:
        why.append("kernel addresses are hidden from the agent (kernel.kptr_restrict; CAP_SYSLOG): a drop for no "
                   "socket outside TCP and UDP (an unanswered ping reply) may count as a lookup miss")  # fmt: skip
    if hook is not None and hook.over_cap:
        why.append(f"{hook.over_cap} namespaces have no sk_lookup hook: --max-lookup-namespaces {hook.cap} was "
                   "reached (their sockets are in the table; their lookups are not counted)")  # fmt: skip
    if hook is not None and hook.refused:
        why.append(f"the kernel refused the sk_lookup hook in {len(hook.refused)} namespaces "
                   f"({next(iter(hook.refused.values()))}): their lookups are not counted")  # fmt: skip
    return why


def status(a: Agent) -> dict:
    assert a.loaded is not None
    t = a.tracker
    counters = a.loaded.counters()
    t.sync_connections(a.tcp_generation(counters))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    runs = a.hook_runs.read(a.loaded.links)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - a.started, 3),
        "load_seconds": round(a.load_seconds, 3),
        "bootstrap_seconds": round(a.bootstrap_seconds, 3),
        "sockets": sum(1 for r in t.rows.values() if r.visible),
        "rows": len(t.rows),
        "pending": len(t.pending),
        "namespaces": len(t.registry.by_cookie),
        "bpf": counters,
        "bpf_programs": {what: {"runs": r.runs, "run_ns": r.run_ns} for what, r in sorted(runs.items())},
        "bpf_stats_counting": a.hook_runs.counting,
        "tracker": t.stats.as_dict(),
        "rss_bytes": rss_bytes(),
        "rss_parts_bytes": rss_parts(),
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
        "last_minute": a.cost.last_minute(t.stats.events.total(), cpu_seconds()),
        "ring_bytes_read": a.ring.bytes_read if a.ring else 0,
        "ring_records_skipped": a.ring.skipped if a.ring else 0,
        "links": len(a.loaded.links),
        "lookup": a.queries.lookup_totals() if a.loaded.lookup is not None else None,
        "hooks_missing": [{"hook": m.hook.what, "why": m.why} for m in a.loaded.missing],
        "hooks_lesser": list(a.loaded.lesser),
        "stream_hooks": [link.what for link in a.loaded.streamed],
        "clients": len(a.clients),
        "subscribers": len(a.publisher.subscribers),
        "metrics": a.metrics_url(),
        "stream_skipped": a.publisher.skipped,
        "clients_dropped": dict(a.clients.dropped),
        **({"web_config_reloads": dict(a.web.reloads)} if a.web is not None else {}),
        "partial": partial(a),
    }
