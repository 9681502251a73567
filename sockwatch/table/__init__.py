"""The socket table: its one owner (Tracker) and the rooms it is built from. Data flows
one way into it (bootstrap dump, hook events, kernel reads when a view asks,
reconcile) and out of it to the views.

Two kinds of rows, kept two ways:
- what receives packets by (IP, port) — TCP listeners, UDP sockets — from hook events as
  they happen (they are few, and a bind or a listen is news);
- TCP connections (every TCP state but LISTEN, TIME-WAIT included) from the kernel's own
  table when a view asks (`sync_connections`): one sock_diag dump per namespace, joined
  with the owners connect() left in the hooks' owner logs (bpf/udp.bpf.c), and only when
  the hooks' generation counter moved or a TIME-WAIT row is due. A connection costs no
  Python work at all until then; its records reach the agent only while someone
  streams them.

What hooks cannot see is read from the kernel when a view asks, not per event: a
socket's inode, the local side the kernel chose for a connected or autobound UDP
socket, and sockets from before sockwatch started.

Rooms, one concern each, layered so that each uses only those below it:
- rules.py: pure rules (which rows and records are connections, record/read -> row);
- store.py: the rows, their indexes, order, change log and tally: the views' way in;
- hook_events.py: hook records into the table;
- owners.py: the owner rule;
- kernel_sync.py: the kernel's own tables, read for what hooks cannot see;
- tracker.py: Tracker, all of them together.
"""

from sockwatch.table.tracker import Tracker

__all__ = ["Tracker"]
