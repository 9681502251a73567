"""The answers to local requests: one handler per request type, each bringing the table
up to date first (`Agent.prepare_answer`), and the lookup hook's counts as views read
them."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from sockwatch import drops, lookups, metrics, tally, views
from sockwatch import filters as flt
from sockwatch.agent import report
from sockwatch.agent.clients import Client
from sockwatch.agent.protocol import ProtocolError, Request, encode_header, parse_request
from sockwatch.agent.tablejson import TableJson
from sockwatch.kernel import bpfload
from sockwatch.model import IPPROTO_TCP, SockRow, render_json

if TYPE_CHECKING:
    from sockwatch.agent.loop import Agent

log = logging.getLogger(__name__)

JSON_CACHE_SECONDS = 10.0  # the whole table as JSON is kept this long after it was last asked for


def to_json(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode() + b"\n"


class Queries:
    def __init__(self, agent: Agent) -> None:
        self.a = agent
        self._json = TableJson()
        self._json_version = -1
        self._json_chunks: list[bytes] = []
        self._json_used = 0.0
        self.ledger = drops.Ledger()
        self._hook_cookies: set[int] = set()  # sockets the drop hook counted that the table has

    def __call__(self, line: bytes, c: Client | None = None) -> list[bytes]:
        """One request's answer; never raises for anything a client can send."""
        try:
            req = parse_request(line)
            f = flt.from_wire(req.filters)
            self._known_namespaces(f)
            handler = {
                "snapshot": self._snapshot,
                "events": self._subscribe,
                "view": self._view,
                "ports": self._ports,
                "status": self._status,
                "lookups": self._lookups,
                "peers": self._peers,
                "drops": self._drops,
            }[req.op]
            return handler(req, f, c)
        except (ProtocolError, flt.FilterError) as e:
            return [encode_header(False, error=str(e))]
        except Exception:
            # a bug in answering must not take the host's agent down with it
            log.exception("answering a request failed")
            self.a.clients.dropped["internal_error"] += 1
            return [encode_header(False, error="internal error in the agent (logged)")]

    def _known_namespaces(self, f: flt.Filters) -> None:
        """A --netns inode no namespace has is an error, not an empty answer (a namespace
        made since the last look is looked for first)."""
        registry = self.a.tracker.registry
        if f.netns and not f.netns <= registry.by_inode.keys():
            registry.refresh()
            unknown = sorted(f.netns - registry.by_inode.keys())
            if unknown:
                raise flt.FilterError(f"no network namespace has inode {unknown[0]} "
                                      f"(sockwatch knows {len(registry.by_inode)}: see sockwatch status)")  # fmt: skip

    def forget_cache(self, now: float) -> None:
        """The whole table as JSON is worth keeping only while someone asks for it."""
        if self._json_version >= 0 and now - self._json_used > JSON_CACHE_SECONDS:
            self._json.clear()
            self._json_version, self._json_chunks = -1, []

    # One handler per request type: (request, its filters, the client) -> the answer's chunks.

    def _snapshot(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.a.prepare_answer()
        if f.empty:
            return [encode_header(True, partial=report.partial(self.a)), *self._full_json()]
        rows = self.a.tracker.snapshot(f)
        return [encode_header(True, rows=len(rows), partial=report.partial(self.a)), render_json(rows)]

    def _view(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.a.prepare_answer(owners=False)  # a screenful's owners are checked, not the table's
        return [encode_header(True, partial=report.partial(self.a)), to_json(self.view(req, f))]

    def _ports(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.a.prepare_answer()
        return [encode_header(True, partial=report.partial(self.a)), to_json(self.ports(f))]

    def _lookups(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        why = self.lookup_missing()
        if why:
            return [encode_header(False, error=why)]
        self.a.prepare_answer()
        dests = lookups.destinations(self.destinations(), self.a.tracker.visible(), f)
        body = {"destinations": dests[: req.limit], "matched": len(dests),
                "closed_ports": lookups.closed_ports(dests)[: req.limit], "totals": self.lookup_totals()}  # fmt: skip
        return [encode_header(True, partial=report.partial(self.a)), to_json(body)]

    def _peers(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        why = self.lookup_missing()
        if why:
            return [encode_header(False, error=why)]
        self.a.prepare_answer()
        found, present = self.peers()
        shown = lookups.peers(found, self.a.tracker.visible(), f)
        body = {"peers": shown[: req.limit], "matched": len(shown), "totals": self.lookup_totals(present)}
        return [encode_header(True, partial=report.partial(self.a)), to_json(body)]

    def _drops(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.a.prepare_answer()
        found = self.socket_drops()
        shown = drops.report(found, f)
        # and the packets that found no socket at all (misses, from the sk_lookup hook), by port
        missed = [] if self.lookup_missing() else lookups.closed_ports(
            lookups.destinations(self.destinations(), self.a.tracker.visible(), f))  # fmt: skip
        body = {"sockets": shown[: req.limit], "matched": len(shown), "no_socket": missed[: req.limit],
                "reasons_missing": self.drops_missing(),
                "uncounted": self.a.loaded.counters().get("drops_uncounted", 0) if self.a.loaded else 0}  # fmt: skip
        return [encode_header(True, partial=report.partial(self.a)), to_json(body)]

    def _status(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        self.a.drain()
        self.a.tracker.resolve_pending()  # what waits for a read is read when asked: status asks too
        if req.bpf_stats:
            try:
                self.a.hook_runs.window.open(time.monotonic() + req.bpf_stats)
            except OSError as e:
                return [encode_header(False, error=f"the kernel would not count BPF runs: {e.strerror}")]
        if req.reconcile:
            self.a.prepare_answer()
            self.a.tracker.reconcile(drain=self.a.drain)
        return [encode_header(True), to_json(report.status(self.a))]

    def _subscribe(self, req: Request, f: flt.Filters, c: Client | None) -> list[bytes]:
        if c is None:
            raise ProtocolError("'events' needs a connection to stream on")
        self.a.drain()  # what happened before the subscription is not streamed
        self.a.publisher.subscribe(c, f, req.kinds)
        return [encode_header(True, stream=True, partial=report.partial(self.a))]

    # ---- the bodies -------------------------------------------------------------------

    def view(self, req: Request, f: flt.Filters) -> dict:
        a = self.a
        by: Counter[tuple[int, int]] = Counter()
        for (_netns, proto, _family, state), n in a.tracker.tally().counts.items():
            by[(proto, state)] += n
        own = req.view in ("peers", "drops")  # windows of their own, not of the table's rows
        answer = views.view(a.tracker.snapshot(), f, "listeners" if own else req.view, req.sort, req.reverse,
                            0 if own else req.offset, 0 if own else req.limit, fix_owners=a.tracker.fix_owners,
                            whole=by)  # fmt: skip
        assert a.loaded is not None
        if req.view == "peers":  # the live peers view: a window of the peers, most packets first
            found = lookups.peers(self.peers()[0], a.tracker.visible(), f) if a.loaded.lookup is not None else []
            answer["selected"] = len(found)
            answer["peers"] = found[req.offset : req.offset + req.limit]
            answer["peers_note"] = self.lookup_missing()
        elif req.view == "drops":  # the live drops view: sockets that dropped packets, most first
            shown = drops.report(self.socket_drops(), f)
            page = shown[req.offset : req.offset + req.limit]
            a.tracker.fix_owners([a.tracker.rows[d["cookie"]] for d in page if d["cookie"] in a.tracker.rows])
            answer["selected"] = len(shown)
            answer["drops"] = page
            answer["drops_note"] = self.drops_missing()
        c = a.last_counters or a.loaded.counters()
        answer["agent"] = {
            "pid": os.getpid(),
            "last_minute": a.cost.last_minute(a.tracker.stats.events.total(), report.cpu_seconds()),
            "lost": {"ring": c.get("ringbuf_full", 0)},
            "subscribers": len(a.publisher.subscribers),
            "metrics": a.metrics_url(),
            "degraded": a.loaded.degraded(),
        }
        answer["ports"] = a.tracker.tally().namespace_summary(a.tracker.port_ranges())  # kept as ports change
        return answer

    def ports(self, f: flt.Filters) -> dict:
        ranges = self.a.tracker.port_ranges()
        if f.empty:
            t = self.a.tracker.tally()
            return {"namespaces": t.namespace_summary(ranges), "pressure": t.pressure(ranges)}
        return tally.ports_report(self.a.tracker.snapshot(f), ranges)

    def _full_json(self) -> list[bytes]:
        """The whole table as JSON, in chunks; once per table version, and then only
        the blocks of rows that changed."""
        self._json_used = time.monotonic()
        t = self.a.tracker
        if self._json_version != t.version:
            touched = t.take_touched()
            if self._json_version < 0:
                touched = None  # nothing kept to reuse
            rows, cookies, marks = t.ordered()
            self._json_chunks = self._json.chunks(rows, touched, cookies, marks)
            self._json_version = t.version
        return self._json_chunks

    # ---- the lookup hook's counts -----------------------------------------------------

    def lookup_missing(self) -> str:
        """Why there are no lookup counts, or ''."""
        loaded = self.a.loaded
        assert loaded is not None
        if loaded.lookup is not None:
            return ""
        if loaded.lookups_off:
            return "this agent runs with --lookups off: lookups, misses and UDP peers are not counted"
        why = next((m.why for m in loaded.missing if m.hook is bpfload.LOOKUP_HOOK), "not attached")
        return f"this agent has no sk_lookup hook ({why}): lookups, misses and UDP peers are not counted"

    def drop_sample(self) -> metrics.DropSample | None:
        if self.a.loaded is None:
            return None
        return metrics.DropSample(self.socket_drops(), self.a.loaded.counters().get("drops_uncounted", 0))

    def drops_missing(self) -> str:
        """Why drops have no reasons here, or ''."""
        loaded = self.a.loaded
        if loaded is None or loaded.drop_counts is not None:
            return ""
        why = next((m.why for m in loaded.missing if m.hook is bpfload.DROP_HOOK), "not attached")
        return f"this agent has no drop hook ({why}): each socket's drops are its total, without reasons"

    def socket_drops(self) -> list[tuple[SockRow, drops.Drops]]:
        """Each socket that dropped anything, with its row (the table brought up to date by
        the caller): UDP sockets and listeners by sk_drops as just read, attributed
        (drops.Ledger), and connections by the drop hook alone."""
        a = self.a
        assert a.loaded is not None
        tracker = a.tracker
        counted = a.loaded.drop_counts
        hooked = counted.read() if counted is not None else {}
        keyed = [r for r in tracker.keyed_by_ip_port() if r.drops is not None]
        seen = [drops.Seen(r.cookie, r.netns, r.protocol == IPPROTO_TCP, r.drops or 0, r.born_ns > 0) for r in keyed]
        rows = tracker.rows
        registry = tracker.registry

        def netstat(inode: int) -> drops.Netstat | None:
            ns = registry.by_inode.get(inode)
            try:
                return drops.parse_netstat(registry.netstat(ns)) if ns is not None else None
            except OSError:  # NamespaceGone included
                return None

        got = self.ledger.update(seen, hooked, netstat, [c for c in hooked if c in rows])
        if counted is not None:  # a counted socket the table had and no longer has: its keys go
            present = {c for c in hooked if c in rows}
            counted.forget(self._hook_cookies - present)
            self._hook_cookies = present
        return [(rows[c], d) for c, d in got.items() if c in rows and (d.total or d.reasons)]

    def inode_of(self, cookie: int) -> int | None:
        ns = self.a.tracker.registry.by_cookie.get(cookie)
        return ns.inode if ns is not None else None

    def destinations(self) -> list[lookups.Destination]:
        """What the sk_lookup hook counted, by namespace inode (read now)."""
        assert self.a.loaded is not None and self.a.loaded.lookup is not None
        return [replace(d, netns=inode) for inode, d in lookups.resolve(self.a.loaded.lookup.counts(), self.inode_of)]

    def peers(self) -> tuple[list[lookups.Peer], int]:
        """The peers kept, by namespace inode and wall time, and how many entries the
        map holds (those of namespaces not yet forgotten included: not evicted)."""
        assert self.a.loaded is not None and self.a.loaded.lookup is not None
        read, in_map = self.a.loaded.lookup.peers()
        wall = self.a.publisher.wall_offset
        kept = [replace(p, netns=inode, last_seen=wall + p.last_seen)
                for inode, p in lookups.resolve(read, self.inode_of)]  # fmt: skip
        return kept, in_map

    def lookup_sample(self) -> metrics.LookupSample | None:
        if self.a.loaded is None or self.a.loaded.lookup is None:
            return None
        found, present = self.peers()
        by: dict[tuple[int, str, str], int] = {}
        for p in found:
            k = (p.netns, str(p.local_address), str(p.local_port))
            by[k] = by.get(k, 0) + 1
        t = self.lookup_totals(present)
        return metrics.LookupSample(self.destinations(), by, t["namespaces_hooked"], t["lookups_uncounted"],
                                    t["misses_unattributed"], t["udp_peers_evicted"],
                                    t["namespaces_over_cap"])  # fmt: skip

    def lookup_totals(self, peers_present: int | None = None) -> dict:
        """The hook's reach and losses. `peers_present`: entries in the peer map, if read."""
        a = self.a
        assert a.loaded is not None
        hook = a.loaded.lookup
        c = a.loaded.counters()
        out = {
            "namespaces_hooked": hook.hooked() if hook else 0,
            "namespaces_known": len(a.tracker.registry.by_cookie),
            "namespaces_refused": len(hook.refused) if hook else 0,
            "namespaces_over_cap": hook.over_cap if hook else 0,  # not hooked: --max-lookup-namespaces reached
            "namespaces_cap": a.settings.max_lookup_namespaces,
            "lookups_uncounted": c.get("lookup_full", 0),
            "misses_unattributed": c.get("miss_unmatched", 0),
            "lookup_keys_capacity": a.settings.max_lookup_keys,
            "udp_peers_capacity": a.settings.max_udp_peers,
            "udp_peers_seen": c.get("peers_new", 0),
            "drop_sites_checked": hook.drop_sites_checked if hook else False,
        }
        if peers_present is not None:
            forgotten = hook.peers_forgotten if hook else 0
            out["udp_peers_evicted"] = max(0, c.get("peers_new", 0) - forgotten - peers_present)
        return out
