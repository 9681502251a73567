"""`sockwatch live`: a top-like view of the socket table (textual).

Fetching is separate from drawing: a worker thread asks the agent for one screenful
(a `view` request: counts over the whole table plus the sorted, filtered window the
screen shows) every refresh interval, and another follows the event stream; the UI
thread only draws what they hand over, so a slow agent never freezes the keys. At
100,000 sockets the agent sends 40 rows, not 100,000.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static

from sockwatch.agent import client
from sockwatch.agent.protocol import SORTS
from sockwatch.cli import events as event_text
from sockwatch.cli.options import parse_filter_text
from sockwatch.containers import Container
from sockwatch.filters import FilterError, Filters
from sockwatch.render import UNKNOWN, endpoint, family_digit, printable_cell

VIEWS = ("listeners", "connections", "processes", "events", "peers", "drops")
VIEW_TITLES = {
    "listeners": "Listeners+UDP by (IP, port)",
    "connections": "Connections by 4-tuple",
    "processes": "Processes",
    "events": "Events",
    "peers": "UDP peers of unconnected sockets (most packets first)",
    "drops": "Sockets that dropped packets (most first), by the kernel's reason",
}
HIGHLIGHT_SECONDS = 2.0
FETCH_TIMEOUT = 10.0  # a screenful; the header says so when the agent is slower
EVENTS_KEPT = 2000

HELP = """\
sockwatch live: keys

1 2 3 4 5 6     listeners+UDP, connections, processes, events, UDP peers,
 or Tab         drops
/               filter, in snapshot's language: proto=udp port=53
                addr=10.0.0.0/8 state=listen pid=123 netns=blue
                (or --port 53 ...); an empty filter clears it
s, S            sort by the next / previous column
r               reverse the sort
PgDn PgUp Home  move through the table
p, Space        pause / resume
?               this help (Esc closes it)
q, Ctrl-C       quit

New sockets show green, closed ones red, for two seconds."""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class FilterScreen(ModalScreen[str | None]):
    BINDINGS: ClassVar = [Binding("escape", "cancel", "cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="filterbox"):
            yield Static("filter (Enter applies, Esc cancels):")
            yield Input(value=self.current, id="filter")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Live(App[None]):
    CSS = """
    #header { height: auto; background: $boost; padding: 0 1; }
    #status { height: 1; background: $panel; padding: 0 1; }
    #help { width: 72; height: auto; border: round $accent; padding: 0 1; background: $surface; }
    HelpScreen, FilterScreen { align: center middle; }
    #filterbox { width: 70; height: auto; border: round $accent; padding: 0 1; background: $surface; }
    DataTable { height: 1fr; }
    """
    BINDINGS: ClassVar = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("question_mark", "help", "help"),
        Binding("slash", "filter", "filter"),
        Binding("p,space", "pause", "pause"),
        Binding("tab", "next_view", "view", show=False),
        Binding("1", "view('listeners')", "listeners"),
        Binding("2", "view('connections')", "connections"),
        Binding("3", "view('processes')", "processes"),
        Binding("4", "view('events')", "events"),
        Binding("5", "view('peers')", "peers"),
        Binding("6", "view('drops')", "drops"),
        Binding("s", "sort(1)", "sort"),
        Binding("S", "sort(-1)", "sort back", show=False),
        Binding("r", "reverse", "reverse", show=False),
        Binding("pagedown", "page(1)", show=False),
        Binding("pageup", "page(-1)", show=False),
        Binding("home", "home", show=False),
    ]

    def __init__(self, socket_path: str, mode: str, refresh: float, view: str = "listeners") -> None:
        super().__init__()
        self.socket_path = socket_path
        self.mode = mode  # "agent" or "in-process"
        self.refresh_seconds = refresh
        self.view_name = view
        self.filter_text = ""
        self.filters = Filters()
        self.sort = "local"
        self.reverse = False
        self.offset = 0
        self.paused = False
        self.data: dict[str, Any] | None = None
        self.error = ""
        self.closed: dict[int, tuple[float, dict]] = {}  # cookie -> (when it went, its last row)
        self.shown: dict[int, dict] = {}
        self.events: deque[bytes] = deque(maxlen=EVENTS_KEPT)
        self.events_note = ""
        self.asked = 0  # bumped whenever what is asked changes (filter, view, sort, page)
        self._shown_query = -1
        self._wake = threading.Event()
        self._stop = threading.Event()

    # ---- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield Static(id="status")
        yield DataTable(id="table", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "sockwatch live"
        # our own daemon threads, not textual workers: a thread blocked on the agent must
        # never hold the process (and a terminal that is gone) at exit
        for target in (self.fetcher, self.follower):
            threading.Thread(target=target, daemon=True, name=f"live-{target.__name__}").start()
        self.set_interval(self.refresh_seconds, self._tick)

    def _tick(self) -> None:
        """Tables redraw when a screenful arrives; the event list as events come."""
        if self.view_name == "events" and not self.paused:
            self.draw()

    def on_unmount(self) -> None:
        self._stop.set()
        self._wake.set()

    # ---- fetching (worker threads; the UI thread never waits on the agent) ---------------

    def rows_wanted(self) -> int:
        table = self.query_one(DataTable)
        return max(10, min(1000, table.size.height or self.size.height))

    def _hand(self, *args: Any) -> bool:
        """Give the UI thread a fetched screenful; False once the app is gone."""
        try:
            self.call_from_thread(self.take, *args)
        except RuntimeError:  # the app has stopped
            self._stop.set()
            return False
        return True

    def fetcher(self) -> None:
        while not self._stop.is_set():
            if not self.paused:
                t0 = time.monotonic()
                query = self.asked
                try:
                    view = "processes" if self.view_name == "processes" else (
                        "all" if self.view_name == "events" else self.view_name)  # fmt: skip
                    got = client.request(
                        "view", self.socket_path, timeout=FETCH_TIMEOUT, filters=self.filters.to_wire(), view=view,
                        sort=self.sort, reverse=self.reverse, offset=self.offset, limit=self.rows_wanted(),
                    )  # fmt: skip
                    if got is None:
                        raise client.AgentError("the agent went away")
                    data = json.loads(got[1])
                    data["fetch_seconds"] = time.monotonic() - t0
                    self._hand(data, "", query)
                except (client.AgentError, ValueError, OSError) as e:
                    self._hand(None, str(e), query)
            self._wake.wait(self.refresh_seconds)
            self._wake.clear()

    def follower(self) -> None:
        """The event stream while the events view is shown (a subscription costs the
        agent, so none is held otherwise). Lines are kept raw, the last EVENTS_KEPT, and
        parsed only when drawn: under churn tens of thousands arrive a second."""
        while not self._stop.is_set():
            if self.view_name != "events":
                self._stop.wait(0.2)
                continue
            try:
                for line in client.subscribe_lines(self.socket_path, heartbeat=0.2):
                    if self._stop.is_set() or self.view_name != "events":
                        break
                    if line is not None and not self.paused:
                        self.events.append(line)
                else:
                    self.events_note = "the agent closed the event stream; reconnecting"
            except (client.AgentError, OSError) as e:
                self.events_note = f"event stream: {e}"
            self._stop.wait(0.5)

    def take(self, data: dict | None, error: str, query: int) -> None:
        self.error = error
        if data is None or query != self.asked:
            return  # an answer to a question no longer asked
        now = time.monotonic()
        rows = {r["cookie"]: r for r in data.get("rows", [])}
        same = query == self._shown_query  # else the screen changed: nothing is news
        self._shown_query = query
        gone = self.shown.keys() - rows.keys()
        if not same:
            self.closed = {}
        elif gone and data.get("selected", 0) < (self.data or {}).get("selected", 0):
            for cookie in gone:  # left the table (not just the window): show it closed for a moment
                self.closed[cookie] = (now, self.shown[cookie])
        self.shown = rows
        self.data = data
        self.draw()

    def refetch(self) -> None:
        self.asked += 1
        self._wake.set()

    # ---- drawing --------------------------------------------------------------------------

    def draw(self) -> None:
        self.query_one("#header", Static).update(self.header_text())
        self.query_one("#status", Static).update(self.status_text())
        table = self.query_one(DataTable)
        if self.view_name == "events":
            self.draw_events(table)
        elif self.view_name == "processes":
            self.draw_processes(table)
        elif self.view_name == "peers":
            self.draw_peers(table)
        elif self.view_name == "drops":
            self.draw_drops(table)
        else:
            self.draw_rows(table)

    def header_text(self) -> Text:
        d = self.data or {}
        c = d.get("counts", {})
        agent = d.get("agent", {})
        t = Text()
        source = "agent pid " + str(agent.get("pid", "?")) if self.mode == "agent" else "in-process agent"
        t.append(f"sockwatch live · {source} · every {self.refresh_seconds:g}s", style="bold")
        if self.paused:
            t.append("  PAUSED", style="bold reverse yellow")
        t.append("\n")
        tcp = c.get("tcp", {})
        udp = c.get("udp", {})
        t.append(f"sockets {c.get('total', 0)}  ", style="bold")
        t.append("tcp " + (" ".join(f"{k} {v}" for k, v in tcp.items()) or "0") + "  ")
        t.append("udp " + (" ".join(f"{k} {v}" for k, v in udp.items()) or "0") + "  ")
        t.append(f"listeners {c.get('listeners', 0)}\n")
        lm = agent.get("last_minute", {})
        lost = agent.get("lost", {})
        t.append(f"events/s {lm.get('events_per_second', 0)}  agent cpu {lm.get('cpu_percent', 0)}%  ")
        ring = lost.get("ring", 0)
        t.append(f"lost {ring} events", style="bold red" if ring else "")
        for p in d.get("ports", [])[:3]:
            pct = 100.0 * p["in_use"] / p["available"] if p["available"] else 0.0
            t.append(f"\nephemeral ports netns {p['netns']}: {p['in_use']}/{p['available']} in use ({pct:.1f}%), "
                     f"range {p['range'][0]}-{p['range'][1]}")  # fmt: skip
        if len(d.get("ports", [])) > 3:
            t.append(f"  (+{len(d['ports']) - 3} namespaces: sockwatch ports)")
        if agent.get("degraded"):
            t.append("\n" + printable_cell(agent["degraded"]), style="yellow")
        return t

    def status_text(self) -> Text:
        d = self.data or {}
        t = Text()
        t.append(f"[{VIEWS.index(self.view_name) + 1}] {VIEW_TITLES[self.view_name]}", style="bold")
        if self.view_name == "events":
            t.append(f"  {len(self.events)} kept")
            if self.events_note:
                t.append("  " + printable_cell(self.events_note), style="red")
        else:
            n = d.get("groups", d.get("selected", 0))
            t.append(f"  rows {self.offset + 1 if n else 0}-{min(n, self.offset + self.rows_wanted())} of {n}")
        if self.filter_text:
            t.append(f"  filter: {printable_cell(self.filter_text)}", style="cyan")
        if self.view_name == "peers" and (self.data or {}).get("peers_note"):
            t.append("  " + printable_cell(self.data["peers_note"]), style="yellow")  # type: ignore[index]
        if self.view_name == "drops" and (self.data or {}).get("drops_note"):
            t.append("  " + printable_cell(self.data["drops_note"]), style="yellow")  # type: ignore[index]
        if self.view_name not in ("processes", "events", "peers", "drops"):
            t.append(f"  sort {self.sort}{' reversed' if self.reverse else ''}")
        if self.error:
            t.append(f"  {printable_cell(self.error)}", style="bold red")
        return t

    def _columns(self, table: DataTable, names: tuple[str, ...]) -> None:
        if tuple(str(c.label) for c in table.columns.values()) != names:
            table.clear(columns=True)
            for n in names:
                table.add_column(n, key=n)

    def draw_rows(self, table: DataTable) -> None:
        wide = self.size.width >= 120
        if self.view_name == "listeners":
            names: tuple[str, ...] = ("PROTO", "STATE", "LOCAL", "PID", "COMM", "NETNS")
            names += ("RECV-Q", "SEND-Q", "CONTAINER", "UID", "INODE", "COOKIE") if wide else ()
        else:
            names = ("PROTO", "STATE", "LOCAL", "REMOTE", "PID", "COMM")
            names += ("NETNS", "AGE", "CONTAINER") if wide else ()
        self._columns(table, names)
        table.clear()
        now = time.monotonic()
        rows = [(r, "") for r in (self.data or {}).get("rows", [])]
        for cookie, (when, r) in list(self.closed.items()):
            if now - when > HIGHLIGHT_SECONDS:
                del self.closed[cookie]
            else:
                rows.append((r, "closed"))
        for r, note in rows[: self.rows_wanted()]:
            born = r.get("born_ns") or 0  # CLOCK_MONOTONIC (this host's); 0 if there at start-up
            fresh = bool(born) and now - born / 1e9 < HIGHLIGHT_SECONDS
            style = "bold red strike" if note else ("bold green" if fresh else "")
            fam = r["family"]
            local = endpoint(r["local_address"], r["local_port"], fam, r.get("device"))
            remote = endpoint(r["remote_address"], r["remote_port"], fam) if r["remote_address"] else "*"
            cells = {
                "PROTO": f"{r['protocol']}{family_digit(fam)}",
                "STATE": "CLOSED" if note else r["state"],
                "LOCAL": local,
                "REMOTE": remote,
                "PID": UNKNOWN if r["pid"] is None else str(r["pid"]),
                "COMM": printable_cell(r["comm"]) if r["comm"] else UNKNOWN,
                "NETNS": str(r["netns"]),
                "UID": UNKNOWN if r["uid"] is None else str(r["uid"]),
                "INODE": UNKNOWN if r["inode"] is None else str(r["inode"]),
                "COOKIE": str(r["cookie"]),
                "RECV-Q": UNKNOWN if r.get("recv_q") is None else str(r["recv_q"]),  # a listener's accept queue
                "SEND-Q": UNKNOWN if r.get("send_q") is None else str(r["send_q"]),  # ... and its limit
                "AGE": _age(r.get("born_ns", 0)),
                "CONTAINER": printable_cell(Container.label_of(r.get("container"))) or UNKNOWN,
            }
            table.add_row(*(Text(cells[n], style=style) for n in names))

    def draw_processes(self, table: DataTable) -> None:
        names = ("PID", "COMM", "TOTAL", "LISTEN", "CONN", "UDP", "TIME-WAIT", "PORTS", "CONTAINER")
        self._columns(table, names)
        table.clear()
        for p in (self.data or {}).get("processes", []):
            table.add_row(
                UNKNOWN if p["pid"] is None else str(p["pid"]),
                printable_cell(p["comm"] or ("(TIME-WAIT: no owner)" if p["time_wait"] == p["total"] else "(unknown)")),
                str(p["total"]), str(p["listeners"]), str(p["connections"]), str(p["udp"]), str(p["time_wait"]),
                ",".join(map(str, p["ports"])), printable_cell(Container.label_of(p.get("container"))) or UNKNOWN,
            )  # fmt: skip

    def draw_peers(self, table: DataTable) -> None:
        names = ("LOCAL", "PEER", "PACKETS", "LAST SEEN", "PID", "COMM", "NETNS")
        self._columns(table, names)
        table.clear()
        now = time.time()
        for p in (self.data or {}).get("peers", []):
            fam = p["family"]
            owner = p["sockets"][0] if p["sockets"] else {}
            ago = max(0.0, now - p["last_seen"])
            table.add_row(
                endpoint(p["local_address"], p["local_port"], fam),
                endpoint(p["remote_address"], p["remote_port"], fam),
                str(p["packets"]), f"{ago:.0f}s ago", "" if owner.get("pid") is None else str(owner["pid"]),
                printable_cell(owner.get("comm") or ("(no socket)" if not p["sockets"] else "")), str(p["netns"]),
            )  # fmt: skip

    def draw_drops(self, table: DataTable) -> None:
        names = ("PROTO", "SOCKET", "DROPS", "REASONS", "QUEUE", "PID", "COMM", "NETNS")
        self._columns(table, names)
        table.clear()
        for d in (self.data or {}).get("drops", []):
            q = d.get("queue")
            queue = "" if not q else (f"accept {q['used']}/{q['limit']}" if q["kind"] == "accept"
                                      else f"rcvbuf {q['used']}/{q['limit']} B")  # fmt: skip
            reasons = ", ".join(f"{k} {v}" for k, v in d["reasons"].items())
            if d.get("earlier"):
                reasons = (reasons + ", " if reasons else "") + f"before sockwatch {d['earlier']}"
            table.add_row(
                d["protocol"] + family_digit(d["family"]), endpoint(d["local_address"], d["local_port"], d["family"]),
                str(d["drops"]), printable_cell(reasons), queue, "" if d["pid"] is None else str(d["pid"]),
                printable_cell(d["comm"] or ""), str(d["netns"]),
            )  # fmt: skip

    def draw_events(self, table: DataTable) -> None:
        self._columns(table, ("EVENT",))
        table.clear()
        shown = 0
        for raw in reversed(self.events):  # newest first
            try:
                e = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(e, dict) or (not self.filters.empty and not self.filters.match_event(e)):
                continue
            style = "bold red" if e.get("kind") in ("bind_fail", "lost") else ""
            table.add_row(Text(event_text.describe(e), style=style))
            shown += 1
            if shown >= self.rows_wanted():
                break

    # ---- keys -----------------------------------------------------------------------------

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        def done(text: str | None) -> None:
            if text is None:
                return
            try:
                self.filters = parse_filter_text(text)
                self.filter_text = text.strip()
                self.error = ""
            except FilterError as e:
                self.error = str(e)
            self.offset = 0
            self.refetch()
            self.draw()

        self.push_screen(FilterScreen(self.filter_text), done)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self._wake.set()
        self.draw()

    def action_view(self, name: str) -> None:
        self.view_name = name
        self.offset = 0
        self.shown, self.closed = {}, {}
        self.refetch()
        self.draw()

    def action_next_view(self) -> None:
        self.action_view(VIEWS[(VIEWS.index(self.view_name) + 1) % len(VIEWS)])

    def action_sort(self, step: int) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + step) % len(SORTS)]
        self.offset = 0
        self.refetch()
        self.draw()

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self.refetch()
        self.draw()

    def action_page(self, step: int) -> None:
        total = (self.data or {}).get("groups", (self.data or {}).get("selected", 0))
        page = self.rows_wanted()
        self.offset = max(0, min(self.offset + step * page, max(0, total - page)))
        self.refetch()

    def action_home(self) -> None:
        self.offset = 0
        self.refetch()


def _age(born_ns: int) -> str:
    if not born_ns:
        return ""
    s = max(0.0, time.monotonic() - born_ns / 1e9)
    return f"{s:.0f}s" if s < 120 else (f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h")
