"""SO_REUSEADDR, SO_REUSEPORT and IPV6_V6ONLY of every TCP or UDP socket on one port of a
namespace, TIME-WAIT sockets included: read by a BPF iterator (bpf_iter_tcp, bpf_iter_udp) when
`explain bind` asks, never on the traffic's path. (The walk's order is kept too, but it
is not the port's hash chain's: bpf_iter_udp walks the address-and-port table.)

A TIME-WAIT socket keeps the reuse flags of the socket it was (tw_reuse, tw_reuseport)
and no system call reads them back; getsockopt through a duplicate of the owner's
descriptor reads a live socket's only. The iterator hands each socket's sock_common to
a program, which reads the flags' byte at the offsets this kernel's own BTF gives
(/sys/kernel/btf/vmlinux, through libbpf: never a header's, which may be another
version's) and records (flags, visit order) per socket cookie in a map. bcc compiles the
program; it is loaded here as a tracing program of the iterator, linked, and run by
reading the iterator's descriptor inside the namespace (an iterator walks the namespace
of the task that opens it). Everything is closed before returning.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from sockwatch.kernel import syscalls

BPF_PROG_LOAD, BPF_LINK_CREATE, BPF_ITER_CREATE = 5, 28, 33
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28
BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_FUNC = 4, 5, 12
MAX_SOCKETS = 4096  # sockets on one port a read keeps (the rest: flags unknown, as before)

PROGRAM = r"""
#include <uapi/linux/bpf.h>
struct sw_flags { u64 order; u8 flags; u8 pad[7]; };
BPF_HASH(port_flags, u64, struct sw_flags, SW_MAX);
BPF_ARRAY(port_order, u64, 1);

/* bpf_iter__tcp and bpf_iter__udp: meta, then the socket (a sock_common at its start) */
int sw_iter(u64 *ctx)
{
	char *sk = (char *)ctx[1];
	if (!sk)
		return 0;
	u16 num = 0;
	bpf_probe_read_kernel(&num, sizeof(num), sk + SW_NUM_OFF);
	if (num != SW_PORT)
		return 0;
	u8 b = 0, p = 0, v = 0;
	bpf_probe_read_kernel(&b, 1, sk + SW_REUSE_BYTE);
	bpf_probe_read_kernel(&p, 1, sk + SW_REUSEPORT_BYTE);
	bpf_probe_read_kernel(&v, 1, sk + SW_V6ONLY_BYTE);
	u32 zero = 0;
	u64 *n = port_order.lookup(&zero);
	if (!n)
		return 0;
	struct sw_flags f = {};
	f.order = (*n)++;
	f.flags = (((b >> SW_REUSE_SHIFT) & 0xf) ? 1 : 0) | (((p >> SW_REUSEPORT_SHIFT) & 1) << 1);
	f.flags |= ((v >> SW_V6ONLY_SHIFT) & 1) << 2;
	u64 cookie = bpf_get_socket_cookie(sk);
	port_flags.update(&cookie, &f);
	return 0;
}
"""


@dataclass(frozen=True)
class Flags:
    reuseaddr: bool
    reuseport: bool
    v6only: bool  # skc_ipv6only: sock_diag reports it for listening and UDP sockets, not for connections
    order: int  # its place in the walk


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class Btf:
    """The kernel's own BTF, as libbpf reads it."""

    def __init__(self) -> None:
        lib = self.lib = syscalls.libbpf()
        lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
        lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.btf__find_by_name_kind.restype = ctypes.c_int32
        lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.btf__type_by_id.restype = ctypes.c_void_p
        lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.btf__name_by_offset.restype = ctypes.c_char_p
        lib.btf__free.argtypes = [ctypes.c_void_p]
        self.btf = lib.btf__load_vmlinux_btf()
        if not self.btf or self.btf > 2**64 - 4096:
            raise OSError(0, "the kernel's BTF (/sys/kernel/btf/vmlinux) could not be read")

    def close(self) -> None:
        if self.btf:
            self.lib.btf__free(self.btf)
            self.btf = None

    def find(self, name: str, kind: int) -> int:
        got = self.lib.btf__find_by_name_kind(self.btf, name.encode(), kind)
        if got <= 0:
            raise OSError(0, f"the kernel's BTF has no {name}")
        return int(got)

    def member_bits(self, struct_name: str, member: str) -> int:
        """The bit offset of `member` in the struct, looked for through anonymous members."""
        found = self._bits(self.find(struct_name, BTF_KIND_STRUCT), member)
        if found is None:
            raise OSError(0, f"the kernel's struct {struct_name} has no {member}")
        return found

    def _bits(self, type_id: int, member: str) -> int | None:
        addr = self.lib.btf__type_by_id(self.btf, type_id)
        t = _BtfType.from_address(addr)
        kind, vlen, bitfields = (t.info >> 24) & 0x1F, t.info & 0xFFFF, t.info >> 31
        if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
            return None
        for i in range(vlen):
            m = _BtfMember.from_address(addr + ctypes.sizeof(_BtfType) + i * ctypes.sizeof(_BtfMember))
            bit = m.offset & 0xFFFFFF if bitfields else m.offset
            if m.name_off == 0:  # an anonymous struct or union: its members are this one's
                inner = self._bits(m.type, member)
                if inner is not None:
                    return bit + inner
            elif self.lib.btf__name_by_offset(self.btf, m.name_off) == member.encode():
                return bit
        return None


def _prog_load(insns: bytes, btf_id: int) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_TRACING, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(lic), 1, len(log), ctypes.addressof(log))  # fmt: skip
    ctypes.memmove(ctypes.addressof(attr) + 48, b"sw_iter", 7)
    struct.pack_into("<I", attr, 68, BPF_TRACE_ITER)
    struct.pack_into("<I", attr, 108, btf_id)
    try:
        return syscalls.bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        lines = [x for x in log.value.decode(errors="replace").splitlines() if x.strip()]
        why = lines[-1] if lines else e.strerror
        raise OSError(e.errno, f"the kernel would not load the iterator ({why})") from None


def _iter_create(link: int) -> int:
    attr = ctypes.create_string_buffer(struct.pack("<II", link, 0), 8)
    return syscalls.bpf(BPF_ITER_CREATE, attr)


def read(protocol: str, port: int, in_namespace: Callable[[Callable[[], None]], None]) -> dict[int, Flags]:
    """cookie -> Flags for every `protocol` ("tcp", "udp") socket on `port` in the namespace
    `in_namespace` runs a function in. OSError where the kernel offers no such iterator."""
    from bcc import BPF

    btf = Btf()
    try:
        reuse = btf.member_bits("sock_common", "skc_reuse")
        reuseport = btf.member_bits("sock_common", "skc_reuseport")
        v6only = btf.member_bits("sock_common", "skc_ipv6only")
        num = btf.member_bits("sock_common", "skc_num")
        target = btf.find(f"bpf_iter_{protocol}", BTF_KIND_FUNC)
    finally:
        btf.close()
    cflags = [f"-DSW_MAX={MAX_SOCKETS}", f"-DSW_PORT={port}", f"-DSW_NUM_OFF={num // 8}",
              f"-DSW_REUSE_BYTE={reuse // 8}", f"-DSW_REUSE_SHIFT={reuse % 8}",
              f"-DSW_REUSEPORT_BYTE={reuseport // 8}", f"-DSW_REUSEPORT_SHIFT={reuseport % 8}",
              f"-DSW_V6ONLY_BYTE={v6only // 8}", f"-DSW_V6ONLY_SHIFT={v6only % 8}", "-w"]  # fmt: skip
    b = BPF(text=PROGRAM, cflags=cflags)
    prog = link = -1
    try:
        prog = _prog_load(bytes(b.dump_func("sw_iter")), target)
        link = syscalls.link_create(prog, 0, BPF_TRACE_ITER)

        def walk() -> None:
            fd = _iter_create(link)  # inside the namespace: the iterator walks the opener's
            try:
                while os.read(fd, 1 << 16):
                    pass
            finally:
                os.close(fd)

        in_namespace(walk)
        return {int(k.value): Flags(bool(v.flags & 1), bool(v.flags & 2), bool(v.flags & 4), int(v.order))
                for k, v in b["port_flags"].items()}  # fmt: skip
    finally:
        for fd in (link, prog):
            if fd >= 0:
                os.close(fd)
        b.cleanup()
