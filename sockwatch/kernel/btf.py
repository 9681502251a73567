"""The running kernel's own BTF (/sys/kernel/btf/vmlinux), read through libbpf: type ids
for programs sockwatch loads itself (a tp_btf target, an iterator) and the offsets of
the few kernel fields an iterator program reads. Never a header's: the headers bcc
compiles against may be another kernel's."""

from __future__ import annotations

import ctypes

from sockwatch.kernel import syscalls

BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_TYPEDEF, BTF_KIND_FUNC = 4, 5, 8, 12


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
