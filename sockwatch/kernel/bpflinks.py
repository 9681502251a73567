"""The kernel's BPF links, read and never changed: which BPF sk_lookup programs run in a
network namespace (another program there may steer packets to other sockets, so
`explain` says so). libbpf's id iteration and object info, as bpftool does."""

from __future__ import annotations

import ctypes
import os

from sockwatch.kernel.syscalls import libbpf

BPF_LINK_TYPE_NETNS = 5  # enum bpf_link_type
BPF_SK_LOOKUP = 36  # enum bpf_attach_type


class _LinkInfo(ctypes.Structure):
    """struct bpf_link_info, as far as its netns member (the union is 8-aligned at 16)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("netns_ino", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 64),
    ]


OBSERVER = "sw_lookup"  # sockwatch's own program (kernel/lookup.py): it returns SK_PASS and never assigns


def prog_name(prog_id: int) -> str:
    """A program's name (struct bpf_prog_info.name, at offset 64), or '' if it is gone."""
    lib = libbpf()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = (ctypes.c_uint8 * 256)()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
            return ""
        return bytes(info[64:80]).split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def sk_lookup_links(netns_inode: int | None) -> list[tuple[int, int, str]]:
    """(link id, program id, program name) of every sk_lookup link attached to the
    namespace (None: to any namespace, a dead one's included until its link is closed)."""
    lib = libbpf()
    out: list[tuple[int, int, str]] = []
    cur, nxt = ctypes.c_uint32(0), ctypes.c_uint32(0)
    while lib.bpf_link_get_next_id(cur, ctypes.byref(nxt)) == 0:
        cur.value = nxt.value
        fd = lib.bpf_link_get_fd_by_id(cur)
        if fd < 0:
            continue  # gone meanwhile
        try:
            info = _LinkInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
                continue
            if (info.type, info.attach_type) == (BPF_LINK_TYPE_NETNS, BPF_SK_LOOKUP) and netns_inode in (
                None,
                info.netns_ino,
            ):
                out.append((info.id, info.prog_id, prog_name(info.prog_id)))
        finally:
            os.close(fd)
    return out
