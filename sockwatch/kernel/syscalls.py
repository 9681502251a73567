"""The one home of every call into the kernel or libbpf that Python's standard library
lacks: the libc and libbpf handles, the syscall numbers of each architecture, and thin
wrappers that turn a failure into OSError with its errno. Every other module calls
these (none opens its own CDLL), so a new architecture is one table here."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import platform

# syscall numbers; pidfd_getfd is asm-generic, the same on every architecture
_NR: dict[str, dict[str, int]] = {
    "bpf": {"x86_64": 321, "aarch64": 280},
    "perf_event_open": {"x86_64": 298, "aarch64": 241},
    "pidfd_getfd": {"x86_64": 438, "aarch64": 438},
}


def nr(name: str) -> int | None:
    """This architecture's number for syscall `name`, or None where unknown."""
    return _NR[name].get(platform.machine())


@functools.cache
def libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


@functools.cache
def libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_create.restype = ctypes.c_int
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    lib.bpf_map_update_elem.restype = ctypes.c_int
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_map_lookup_elem.restype = ctypes.c_int
    lib.bpf_link_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_prog_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_enable_stats.argtypes = [ctypes.c_int]
    lib.bpf_link_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_raw_tracepoint_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.bpf_raw_tracepoint_open.restype = ctypes.c_int
    return lib


def _failed(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def syscall(name: str, *args: object) -> int:
    """syscall(2) by name; its result, or OSError (ENOSYS on an unknown architecture)."""
    number = nr(name)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown architecture {platform.machine()}")
    got = libc().syscall(number, *args)
    if got < 0:
        raise _failed(name)
    return int(got)


def bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(2) with `attr` (a ctypes buffer); its result (an fd for the commands that make one)."""
    return syscall("bpf", cmd, attr, len(attr))


BPF_PROG_LOAD = 5


def prog_load(insns: bytes, prog_type: int, attach_type: int, name: bytes, attach_btf_id: int = 0) -> int:
    """BPF_PROG_LOAD of instructions bcc compiled (its maps' descriptors already in them);
    the program's fd. OSError with the verifier's last line (asked for only on failure)."""
    import struct

    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(0)
    for level in (0, 1):  # again with the verifier's log only to say why
        if level:
            log = ctypes.create_string_buffer(1 << 16)
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                         ctypes.addressof(lic), level, len(log) if level else 0,
                         ctypes.addressof(log) if level else 0)  # fmt: skip
        ctypes.memmove(ctypes.addressof(attr) + 48, name[:15], len(name[:15]))  # prog_name
        struct.pack_into("<I", attr, 68, attach_type)  # expected_attach_type
        struct.pack_into("<I", attr, 108, attach_btf_id)  # (attach_btf_obj_fd 0: vmlinux)
        try:
            return bpf(BPF_PROG_LOAD, attr)
        except OSError as e:
            if level:
                lines = [x for x in log.value.decode(errors="replace").splitlines() if x.strip()]
                raise OSError(e.errno, f"the kernel would not load it ({lines[-1] if lines else e.strerror})") from None
    raise AssertionError("unreachable")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link of the program to the target (a cgroup, a namespace, a perf event): its fd."""
    fd = libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None)
    if fd < 0:
        err = -fd if fd < -1 else ctypes.get_errno()
        raise OSError(err, f"BPF_LINK_CREATE: {os.strerror(err)}")
    return int(fd)


def setns(fd: int, nstype: int) -> None:
    if libc().setns(fd, nstype) != 0:
        raise _failed("setns")


def madvise(start: int, length: int, advice: int) -> bool:
    return bool(libc().madvise(start, length, advice) == 0)


M_ARENA_MAX = -8


def one_malloc_arena() -> None:
    """Every thread allocates from the main heap (glibc only): the agent's only other
    threads are a connection read's receivers, and an arena of their own would keep
    the pages their buffers used resident between reads."""
    try:
        libc().mallopt(M_ARENA_MAX, 1)
    except AttributeError:
        pass


def malloc_trim() -> None:
    """Give freed heap back to the kernel (glibc only; elsewhere nothing to do)."""
    try:
        libc().malloc_trim(0)
    except AttributeError:
        pass
