"""SO_REUSEADDR, SO_REUSEPORT and IPV6_V6ONLY of every TCP or UDP socket on one port of a
namespace, TIME-WAIT sockets included: read by a BPF iterator (bpf_iter_tcp, bpf_iter_udp) when
`explain bind` asks, never on the traffic's path.

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
from sockwatch.kernel.btf import BTF_KIND_FUNC, Btf

BPF_ITER_CREATE = 33
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28
MAX_SOCKETS = 4096  # sockets on one port a read keeps (the rest: flags unknown, as before)

PROGRAM = r"""
#include <uapi/linux/bpf.h>
BPF_HASH(port_flags, u64, u8, SW_MAX);

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
	u8 f = (((b >> SW_REUSE_SHIFT) & 0xf) ? 1 : 0) | (((p >> SW_REUSEPORT_SHIFT) & 1) << 1);
	f |= ((v >> SW_V6ONLY_SHIFT) & 1) << 2;
	u64 cookie = bpf_get_socket_cookie(sk);
	port_flags.update(&cookie, &f);
	return 0;
}
"""


@dataclass(frozen=True)
class Flags:
    reuseaddr: bool
    reuseport: bool
    v6only: bool  # skc_ipv6only: sock_diag reports it for unconnected sockets, not for connections


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
        prog = syscalls.prog_load(bytes(b.dump_func("sw_iter")), BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER, b"sw_iter",
                                  target)  # fmt: skip
        link = syscalls.link_create(prog, 0, BPF_TRACE_ITER)

        def walk() -> None:
            fd = _iter_create(link)  # inside the namespace: the iterator walks the opener's
            try:
                while os.read(fd, 1 << 16):
                    pass
            finally:
                os.close(fd)

        in_namespace(walk)
        return {int(k.value): Flags(bool(v.value & 1), bool(v.value & 2), bool(v.value & 4))
                for k, v in b["port_flags"].items()}  # fmt: skip
    finally:
        for fd in (link, prog):
            if fd >= 0:
                os.close(fd)
        b.cleanup()
