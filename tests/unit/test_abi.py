"""The Python side of bpf/sockwatch.h against the C compiler's layout: every field's
offset and every struct's size (the agent repeats the size check against bcc at load),
and the ring-record decoding against records built by hand."""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
import subprocess
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockwatch import events
from sockwatch.events import Event
from sockwatch.kernel import abi
from sockwatch.kernel.bpfload import BPF_DIR


def event_offsets() -> dict[str, int]:
    codes = re.findall(r"\d*[a-zA-Z]", abi.EVENT.format[1:])
    assert len(codes) == len(Event._fields)
    return {name: struct.calcsize("<" + "".join(codes[:i])) for i, name in enumerate(Event._fields)}


def compiled_layout() -> dict[str, int]:
    fields = {
        "sw_event": list(Event._fields),
        "sw_bind": [f for f, *_ in abi.SwBind._fields_],
        "sw_owner_slot": [f for f, *_ in abi.SwOwnerSlot._fields_],
    }
    lines = []
    for cname, names in fields.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname in names:
            lines.append(f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    src = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        f'#include "{BPF_DIR}/sockwatch.h"\nint main(void) {{\n' + "\n".join(lines) + "\nreturn 0; }\n"
    )
    with tempfile.TemporaryDirectory() as d:
        c, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
        with open(c, "w") as f:
            f.write(src)
        subprocess.run(["gcc", "-o", exe, c], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_every_field_and_size_matches_the_header():
    layout = compiled_layout()
    assert abi.EVENT.size == layout["sw_event"]
    for name, off in event_offsets().items():
        assert off == layout[f"sw_event.{name}"], name
    for cname, mirror in (("sw_bind", abi.SwBind), ("sw_owner_slot", abi.SwOwnerSlot)):
        assert ctypes.sizeof(mirror) == layout[cname]
        for fname, *_ in mirror._fields_:
            assert getattr(mirror, fname).offset == layout[f"{cname}.{fname}"], fname
    # the union: `life` overlays comm, two u64s (events.life)
    assert events._LIFE.size == abi.SW_COMM_LEN


def test_size_mismatch_is_reported_with_a_remedy():
    with pytest.raises(abi.AbiMismatch, match="update the mirror"):
        abi.check_sizes({"sw_event": abi.EVENT.size + 8})


def test_header_and_python_agree_on_every_number():
    text = (BPF_DIR / "sockwatch.h").read_text()
    homes = {"SW_EV_": (events, ""), "SW_F_": (events, "F_"), "SW_C_": (abi, "SW_C_"), "SW_U_": (abi, "SW_U_"),
             "SW_CFG_": (abi, "SW_CFG_"), "SW_B_": (events, "B_")}  # fmt: skip
    seen = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[:2] == ["#define", "SW_OWNER_SLOTS"]:
            assert int(parts[2]) == abi.SW_OWNER_SLOTS
            continue
        if len(parts) < 3 or parts[0] != "#define":
            continue
        for prefix, (module, py_prefix) in homes.items():
            if parts[1].startswith(prefix):
                name = py_prefix + parts[1][len(prefix) :]
                assert getattr(module, name) == int(parts[2], 0), parts[1]
                seen += 1
    assert seen >= 21


def decode(chunk: bytes) -> tuple[list[Event], int]:
    batch, used = abi.decode_batch(chunk)
    return batch.events(), used


def ev(cookie: int, kind: int = events.CONNECT, **kw: object) -> Event:
    base = dict.fromkeys(Event._fields, 0) | {"local_addr": bytes(16), "remote_addr": bytes(16), "comm": bytes(16)}
    base |= {"cookie": cookie, "kind": kind, "family": socket.AF_INET, "protocol": 6} | kw
    return Event(**base)  # type: ignore[arg-type]


def test_records_decode_back_to_the_same_events():
    evs = [ev(i, local_port=1000 + i, comm=b"nginx".ljust(16, b"\0")) for i in range(1, 50)]
    decoded, used = decode(abi.records(evs))
    assert decoded == evs and used == len(evs) * abi.RECORD.size


def test_decoding_stops_at_a_record_still_being_written():
    raw = bytearray(abi.records([ev(1), ev(2), ev(3)]))
    struct.pack_into("<I", raw, abi.RECORD.size, abi.EVENT.size | abi.RINGBUF_BUSY)
    decoded, used = decode(bytes(raw))
    assert [e.cookie for e in decoded] == [1] and used == abi.RECORD.size
    assert decode(bytes(raw[abi.RECORD.size :])) == ([], 0)


def test_decoding_stops_before_a_record_of_another_size():
    raw = bytearray(abi.records([ev(1), ev(2)]))
    struct.pack_into("<I", raw, abi.RECORD.size, 40)
    decoded, _ = decode(bytes(raw))
    assert [e.cookie for e in decoded] == [1]


def test_a_partial_record_is_left_for_next_time():
    raw = abi.records([ev(1), ev(2)])
    decoded, used = decode(raw[: abi.RECORD.size + 10])
    assert [e.cookie for e in decoded] == [1] and used == abi.RECORD.size


_small = st.integers(min_value=0, max_value=255)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 2**64 - 1), st.sampled_from([*events.KIND_NAMES]), st.sampled_from([6, 17]), _small, _small
        ),
        max_size=40,
    )
)
def test_batch_columns_agree_with_the_events_they_come_from(specs):
    evs = [ev(c, kind, protocol=p, state=s, old_state=o, pid=i) for i, (c, kind, p, s, o) in enumerate(specs)]
    batch, used = abi.decode_batch(abi.records(evs))
    assert used == len(evs) * abi.RECORD.size and len(batch) == len(evs)
    assert batch.events() == evs
    assert batch.cookies == [e.cookie for e in evs]
    assert list(batch.kinds) == [e.kind for e in evs]
    assert batch.ends() == [events.ends_socket(e) for e in evs]


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"nginx".ljust(16, b"\0"), "nginx"),
        (b"python\0\x07\0\x01" + bytes(6), "python"),  # 6.1: an older record's bytes after the NUL
        (b"sixteen-chars-xx", "sixteen-chars-xx"),  # TASK_COMM_LEN full: no NUL at all
        (bytes(16), ""),
        (b"caf\xc3\xa9\0\xff" + bytes(9), "café"),
    ],
)
def test_a_task_name_ends_at_its_first_nul(raw, text):
    assert events.comm_text(raw) == text


def log_of(head: int, slots: dict[int, tuple[int, int, int, int]]) -> bytes:
    raw = bytearray(abi.OWNER_LOG_SIZE)
    raw[:8] = head.to_bytes(8, "little")
    for i, slot in slots.items():
        abi.OWNER_SLOT.pack_into(raw, 8 + i * abi.OWNER_SLOT.size, *slot)
    return bytes(raw)


@pytest.mark.parametrize(("head", "slots", "want"), [
    (0, {}, []),  # nothing connected yet
    (2, {0: (11, 100, 0, 11), 1: (12, 101, 0, 12)}, [(11, 100), (12, 101)]),
    (3, {0: (11, 100, 0, 11), 1: (12, 101, 0, 99), 2: (13, 102, 0, 13)}, [(11, 100), (13, 102)]),  # torn
    # wrapped: the oldest slot is the one head will write next
    (abi.SW_OWNER_SLOTS + 1, {0: (21, 1, 0, 21), 1: (5, 2, 0, 5), abi.SW_OWNER_SLOTS - 1: (9, 3, 0, 9)},
     [(5, 2), (9, 3), (21, 1)]),
], ids=["empty", "in order", "a torn slot", "wrapped"])  # fmt: skip
def test_owner_log_slots_oldest_first_without_torn_ones(head, slots, want):
    assert list(abi.owners_of_log(log_of(head, slots))) == want


def test_owner_logs_read_again_decode_only_what_was_written_since():
    """Reading the logs again gives what decoding them whole gives, whatever was written
    between two reads (a few slots, a slot torn then finished, a whole lap of the ring)."""
    import random

    rnd = random.Random(7)
    logs = abi.OwnerLogs()
    slots: dict[int, tuple[int, int, int, int]] = {}
    head = 0
    cookie = 1
    for _ in range(80):
        if rnd.random() < 0.5 and slots:  # the last slot, torn at the last read, finished since
            i = (head - 1 - rnd.choice([0, 0, 3])) % abi.SW_OWNER_SLOTS
            c, p, _pad, _e = slots[i]
            slots[i] = (c, p, 0, c)
        for _ in range(rnd.choice([0, 0, 1, 5, 70, abi.SW_OWNER_SLOTS + 3])):
            end = cookie if rnd.random() > 0.3 else 0  # a writer caught between its stores
            slots[head % abi.SW_OWNER_SLOTS] = (cookie, 1000 + cookie % 50, 0, end)
            head += 1
            cookie += 1
        raw = log_of(head, slots)
        logs.update(0, raw)
        assert logs.owners() == dict(abi.owners_of_log(raw))
