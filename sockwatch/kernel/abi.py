"""The edge between kernel and Python: mirrors of bpf/sockwatch.h, checked against the
compiled structs at load, and the bulk decoding of ring-buffer records into events.

A header change that Python does not follow fails loudly at load instead of misreading.
"""

from __future__ import annotations

import ctypes
import functools
import re
import struct

from sockwatch.events import Event, EventBatch

SW_COMM_LEN = 16

SW_C_RINGBUF_FULL = 0
SW_C_EVENTS = 1
SW_C_LOOKUP_FULL = 2
SW_C_MISS_UNMATCHED = 3
SW_C_PEERS_NEW = 4
SW_C_TCP_CHANGES = 5
SW_C_TCP_OPENED = 6
SW_C_DROPS_UNCOUNTED = 7
SW_C_MAX = 8
COUNTER_NAMES = (
    "ringbuf_full",
    "events",
    "lookup_full",
    "miss_unmatched",
    "peers_new",
    "tcp_changes",
    "tcp_opened",
    "drops_uncounted",
)

SW_CFG_CONNECT_OWNER = 1
SW_CFG_STREAM = 2
SW_CFG_MAX = 3

# struct sw_event, field for field (see Event); '<' = x86-64/arm64 little-endian, no padding
EVENT = struct.Struct("<QQQ16s16sIIHHBBBBBBHi16s")
# a ring record: 8-byte header (u32 length with BUSY/DISCARD bits, u32 page offset), the
# event, padded to 8 bytes
RECORD_HEADER = 8
RECORD = struct.Struct("<8x" + EVENT.format[1:] + f"{(-EVENT.size) % 8}x")
RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
# the high byte of a record's length word: BUSY or DISCARD set, or a length > 2^24
_UNUSUAL_HIGH_BYTE = re.compile(rb"[\x01-\xff]")


class SwOwnerSlot(ctypes.Structure):
    """struct sw_owner_slot: who connect()ed a TCP socket, one slot of owner_log."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("cookie_end", ctypes.c_uint64),
    ]


SW_OWNER_SLOTS = 8192
OWNER_SLOT = struct.Struct("<QIIQ")  # the same, for decoding a whole log at once
OWNER_LOG_SIZE = 8 + SW_OWNER_SLOTS * OWNER_SLOT.size  # struct sw_owner_log: head, slots
assert OWNER_SLOT.size == ctypes.sizeof(SwOwnerSlot)


class OwnerLogs:
    """The CPUs' owner_logs as last read, each read decoding only the slots written
    since (a view after one new connection need not decode 8192 slots per CPU), and
    the RECHECK before them, which a writer may have been filling at the last read."""

    RECHECK = 64

    def __init__(self) -> None:
        self._cpus: dict[int, tuple[int, list[tuple[int, int] | None]]] = {}  # cpu -> (head, slots)

    def update(self, cpu: int, raw: bytes) -> None:
        head = int.from_bytes(raw[:8], "little")
        prev = self._cpus.get(cpu)
        if prev is None or head < prev[0] or head - prev[0] + self.RECHECK >= SW_OWNER_SLOTS:
            slots = [
                (c, p) if c and c == e else None for c, p, _pad, e in OWNER_SLOT.iter_unpack(raw[8:OWNER_LOG_SIZE])
            ]
        else:
            slots = prev[1]
            for i in range(max(prev[0] - self.RECHECK, 0), head):
                j = i % SW_OWNER_SLOTS
                c, p, _pad, e = OWNER_SLOT.unpack_from(raw, 8 + j * OWNER_SLOT.size)
                slots[j] = (c, p) if c and c == e else None
        self._cpus[cpu] = (head, slots)

    def owners(self) -> dict[int, int]:
        """cookie -> pid of every whole slot, the newest winning."""
        out: dict[int, int] = {}
        for head, slots in self._cpus.values():
            start = head % SW_OWNER_SLOTS if head >= SW_OWNER_SLOTS else 0
            out.update(filter(None, slots[start:]))
            out.update(filter(None, slots[:start]))
        return out


def owners_of_log(raw: bytes) -> list[tuple[int, int]]:
    """(cookie, pid) of every whole slot of one CPU's owner_log, oldest first (a slot
    torn by a concurrent overwrite, or never written, is skipped)."""
    head = int.from_bytes(raw[:8], "little")
    start = head % SW_OWNER_SLOTS if head >= SW_OWNER_SLOTS else 0
    slots = list(OWNER_SLOT.iter_unpack(raw[8:OWNER_LOG_SIZE]))
    return [(cookie, pid) for cookie, pid, _pad, end in slots[start:] + slots[:start] if cookie and cookie == end]


class SwBind(ctypes.Structure):
    """struct sw_bind: a bind() in progress (read by tests; the kernel side owns it)."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("netns_cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint32 * 4),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("posted", ctypes.c_uint8),
        ("opts", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
        ("bound_dev", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class SwLookupKey(ctypes.Structure):
    """struct sw_lookup_key: a destination the kernel looked up a socket for."""

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 16),  # network order
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("pad", ctypes.c_uint32),
    ]


class SwLookupCount(ctypes.Structure):
    _fields_ = [("lookups", ctypes.c_uint64), ("misses", ctypes.c_uint64)]


class SwPeerKey(ctypes.Structure):
    """struct sw_peer_key: a remote peer of an unconnected UDP socket's destination."""

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("local_addr", ctypes.c_uint8 * 16),  # network order
        ("remote_addr", ctypes.c_uint8 * 16),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
    ]


class SwPeerCount(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


class SwLookupCached(ctypes.Structure):
    """struct sw_lookup_cached: a lookup_cache slot (lookups 0: empty)."""

    _fields_ = [("key", SwLookupKey), ("lookups", ctypes.c_uint64), ("misses", ctypes.c_uint64)]


class SwPeerCached(ctypes.Structure):
    """struct sw_peer_cached: a peer_cache slot (packets since it last reached udp_peers)."""

    _fields_ = [("key", SwPeerKey), ("packets", ctypes.c_uint64), ("last_ns", ctypes.c_uint64),
                ("flushed_ns", ctypes.c_uint64)]  # fmt: skip


class SwDropKey(ctypes.Structure):
    """struct sw_drop_key: a socket_drops key."""

    _fields_ = [("cookie", ctypes.c_uint64), ("reason", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


MIRRORS = {
    "sw_drop_key": SwDropKey,
    "sw_owner_slot": SwOwnerSlot,
    "sw_bind": SwBind,
    "sw_lookup_key": SwLookupKey,
    "sw_lookup_count": SwLookupCount,
    "sw_peer_key": SwPeerKey,
    "sw_peer_count": SwPeerCount,
    "sw_lookup_cached": SwLookupCached,
    "sw_peer_cached": SwPeerCached,
}


class AbiMismatch(RuntimeError):
    pass


def check_sizes(compiled: dict[str, int]) -> None:
    """compiled: struct name -> size the C compiler gave it."""
    ours = {"sw_event": EVENT.size} | {name: ctypes.sizeof(t) for name, t in MIRRORS.items()}
    for name, size in compiled.items():
        if ours[name] != size:
            raise AbiMismatch(
                f"struct {name} is {size} bytes in bpf/sockwatch.h but {ours[name]} in sockwatch/kernel/abi.py: "
                "update the mirror"
            )


def _offset_in_record(prefix: str) -> int:
    """Byte offset in a ring record of the field after `prefix` (EVENT's leading formats)."""
    return RECORD_HEADER + struct.calcsize("<" + prefix)


_COOKIE_WORD = RECORD_HEADER // 8  # the cookie is the record's second u64
_PROTOCOL = _offset_in_record("QQQ16s16sIIHHB")
_KIND, _STATE, _OLD_STATE = _PROTOCOL + 1, _PROTOCOL + 2, _PROTOCOL + 3
assert RECORD.size % 8 == 0 and EVENT.format.startswith("<QQQ16s16sIIHHBBBBB")
_new_event = functools.partial(tuple.__new__, Event)


def decode_batch(chunk: bytes | memoryview) -> tuple[EventBatch, int]:
    """The committed records at the start of chunk, copied once, and how many bytes
    they took.

    Every record sockwatch writes has the same size, so the run of committed records
    ends at the first one still being written (BUSY) or of another shape, which the
    caller reads next time. The columns the tracker needs to skip born-and-gone sockets
    are strided slices of the copy; an Event is unpacked only when asked for.
    """
    n = len(chunk) // RECORD.size
    if n:
        # byte 3 of each header: length >> 24 plus the BUSY and DISCARD bits
        highs = bytes(chunk[3 : n * RECORD.size : RECORD.size])
        lows = bytes(chunk[0 : n * RECORD.size : RECORD.size])
        m = _UNUSUAL_HIGH_BYTE.search(highs)
        if m is not None:
            n = m.start()
        if lows.count(EVENT.size) != len(lows):  # a record of another size: stop before it
            n = min(n, next(i for i, b in enumerate(lows) if b != EVENT.size))
    size = RECORD.size
    data = bytes(chunk[: n * size])
    unpack = RECORD.unpack_from
    batch = EventBatch(
        memoryview(data).cast("Q")[_COOKIE_WORD :: size // 8].tolist(),
        data[_KIND::size],
        data[_PROTOCOL::size],
        data[_STATE::size],
        data[_OLD_STATE::size],
        lambda i: _new_event(unpack(data, i * size)),
    )
    return batch, n * size


def records(events: list[Event]) -> bytes:
    """Ring contents for these events, as the kernel lays them out (tests decode them back)."""
    pad = b"\0" * (RECORD.size - RECORD_HEADER - EVENT.size)
    return b"".join(struct.pack("<II", EVENT.size, 0) + EVENT.pack(*e) + pad for e in events)
