"""Reading a BPF ring buffer the way the kernel lays it out, in bulk.

libbpf's ring_buffer__consume calls back once per record; from Python that is a ctypes
trampoline per event, which at tens of thousands of events a second is most of the
agent's CPU. The ring is memory we can map instead (kernel/bpf/ringbuf.c): a page with
the consumer position (ours to write), a page with the producer position, then the data
pages mapped twice in a row so that a record that wraps is still contiguous. One copy
takes everything committed; abi.decode_records turns it into events in one pass.
"""

from __future__ import annotations

import mmap
import os
import struct

from sockwatch.events import Event
from sockwatch.kernel import abi

_POS = struct.Struct("<Q")


class RingReader:
    def __init__(self, map_fd: int, data_size: int) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        self.fd = map_fd  # readable (EPOLLIN) when the BPF side forces a wakeup
        self.size = data_size
        self._mask = data_size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._prod)[page:]
        self.bytes_read = 0
        self.skipped = 0

    def pending_bytes(self) -> int:
        return _POS.unpack_from(self._prod, 0)[0] - _POS.unpack_from(self._cons, 0)[0]

    def read(self) -> list[Event]:
        """Every event committed so far, oldest first; the ring space is given back."""
        out: list[Event] = []
        while True:
            cons = _POS.unpack_from(self._cons, 0)[0]
            prod = _POS.unpack_from(self._prod, 0)[0]
            if prod == cons:
                return out
            start = cons & self._mask
            events, used = abi.decode_records(self._data[start : start + (prod - cons)])
            out += events
            if used == 0:
                (hdr,) = struct.unpack_from("<I", self._data, start)
                if hdr & abi.RINGBUF_BUSY:
                    return out  # the oldest record is still being written
                # discarded, or not ours: step over it (sockwatch writes neither)
                used = ((hdr & ~(abi.RINGBUF_BUSY | abi.RINGBUF_DISCARD)) + abi.RECORD_HEADER + 7) & ~7
                self.skipped += 1
            _POS.pack_into(self._cons, 0, cons + used)
            self.bytes_read += used

    def close(self) -> None:
        self._data.release()
        self._prod.close()
        self._cons.close()
