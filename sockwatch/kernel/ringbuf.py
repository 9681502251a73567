"""Reading a BPF ring buffer the way the kernel lays it out, in bulk.

libbpf's ring_buffer__consume calls back once per record; from Python that is a ctypes
trampoline per event, which at tens of thousands of events a second is most of the
agent's CPU. The ring is memory we can map instead (kernel/bpf/ringbuf.c): a page with
the consumer position (ours to write), a page with the producer position, then the data
pages mapped twice in a row so that a record that wraps is still contiguous. One copy
takes everything committed; abi.decode_batch turns it into columns and events.
"""

from __future__ import annotations

import mmap
import os
import struct

from sockwatch.events import EventBatch
from sockwatch.kernel import abi


class RingReader:
    def __init__(self, map_fd: int, data_size: int) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        self.fd = map_fd  # readable (EPOLLIN) when the BPF side forces a wakeup
        self.size = data_size
        self._mask = data_size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._prod)[page:]
        # The positions are read and written with single 8-byte accesses (memoryview
        # 'Q' items): struct packs '<Q' byte by byte, and the kernel read a half-written
        # consumer position as "the ring is full" (reserve failed with the ring empty).
        self._cons_pos = memoryview(self._cons)[:8].cast("Q")
        self._prod_pos = memoryview(self._prod)[:8].cast("Q")
        self.bytes_read = 0
        self.skipped = 0  # records of a shape sockwatch never writes (shown by status)

    def read(self) -> list[EventBatch]:
        """Every record committed so far, oldest first, as batches (usually one; two
        when the run stops at a record sockwatch did not write); the ring space is
        given back."""
        out: list[EventBatch] = []
        while True:
            cons = self._cons_pos[0]
            prod = self._prod_pos[0]
            if prod == cons:
                return out
            start = cons & self._mask
            batch, used = abi.decode_batch(self._data[start : start + (prod - cons)])
            if used:
                out.append(batch)
            if used == 0:
                (hdr,) = struct.unpack_from("<I", self._data, start)
                if hdr & abi.RINGBUF_BUSY:
                    return out  # the oldest record is still being written
                # discarded, or not ours: step over it (sockwatch writes neither)
                used = ((hdr & ~(abi.RINGBUF_BUSY | abi.RINGBUF_DISCARD)) + abi.RECORD_HEADER + 7) & ~7
                self.skipped += 1
            self._cons_pos[0] = cons + used
            self.bytes_read += used

    def close(self) -> None:
        self._cons_pos.release()
        self._prod_pos.release()
        self._data.release()
        self._prod.close()
        self._cons.close()
