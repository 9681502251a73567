"""What the kernel and the machine must offer, each checked with one clear sentence
and what to do about it. `sockwatch doctor` shows them all; other commands stop at
the first one that fails."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

from sockwatch.kernel import syscalls

TRACEFS = "/sys/kernel/tracing"
INSTALL_HINT = "run scripts/install.sh (it installs and links everything sockwatch needs)"


class PrereqError(RuntimeError):
    """A missing prerequisite; str() is the sentence to show, .fix what to do."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


WITHOUT_BPF = "meanwhile 'sockwatch snapshot --standalone' reads the kernel without BPF"


CGROUP_ROOT_ENV = "SOCKWATCH_CGROUP_ROOT"


def cgroup2_path() -> str | None:
    """The cgroup v2 hierarchy the hooks attach to: the first cgroup2 mount, or the one
    SOCKWATCH_CGROUP_ROOT names (a container in its own cgroup namespace sees its own
    cgroup at /sys/fs/cgroup; the host's, mounted elsewhere, is the one to attach to).
    None if there is none (or the named path is not a cgroup2 mount)."""
    want = os.environ.get(CGROUP_ROOT_ENV) or None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2" and (want is None or parts[1] == want.rstrip("/")):
                    return parts[1]
    except OSError:
        pass
    return None


def headers_dir() -> str | None:
    """Kernel headers bcc compiles against: /lib/modules/$(uname -r)/build, or kheaders."""
    build = f"/lib/modules/{platform.release()}/build"
    if os.path.isdir(os.path.join(build, "include")):
        return os.path.realpath(build)
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None


BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2


def bpf_syscall_error() -> int:
    """0 if the kernel lets this process use bpf() (a one-entry array map is created and
    closed at once), else the errno (EPERM: no capability or a seccomp filter; ENOSYS:
    a kernel without BPF)."""
    if syscalls.nr("bpf") is None:
        return 0  # unknown architecture: let bcc find out
    attr = struct.pack("<IIII", BPF_MAP_TYPE_ARRAY, 4, 4, 1).ljust(128, b"\0")
    try:
        fd = syscalls.bpf(BPF_MAP_CREATE, ctypes.create_string_buffer(attr, len(attr)))
    except OSError as e:
        return e.errno or errno.EPERM
    os.close(fd)
    return 0


def checks() -> list[Check]:
    out = []
    root = os.geteuid() == 0
    out.append(
        Check(
            "root",
            root,
            "running as root" if root else f"running as uid {os.geteuid()}",
            "" if root else "run sockwatch as root (sudo sockwatch ...): BPF and other namespaces need it",
        )
    )
    try:
        import bcc  # noqa: F401

        out.append(Check("bcc", True, "python3-bpfcc importable"))
    except ImportError:
        out.append(
            Check(
                "bcc",
                False,
                "bcc's Python module (Debian python3-bpfcc) is not importable",
                INSTALL_HINT + "; PyPI's 'bcc' is an unrelated package",
            )
        )
    err = bpf_syscall_error() if root else 0
    out.append(
        Check(
            "bpf",
            err == 0,
            "the bpf() system call works" if err == 0 else f"the kernel refuses bpf(): {os.strerror(err)}",
            ""
            if err == 0
            else "run on the host as root, or give the container CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN "
            "and a seccomp profile that allows bpf(); " + WITHOUT_BPF,
        )
    )
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    out.append(
        Check(
            "btf",
            btf,
            "/sys/kernel/btf/vmlinux present" if btf else "no kernel BTF",
            "" if btf else "not required by sockwatch; needed only by CO-RE tools",
        )
    )
    cg = cgroup2_path()
    out.append(
        Check(
            "cgroup2",
            cg is not None,
            f"cgroup v2 at {cg}"
            if cg
            else (
                f"{os.environ[CGROUP_ROOT_ENV]} ({CGROUP_ROOT_ENV}) is not a cgroup v2 mount"
                if os.environ.get(CGROUP_ROOT_ENV)
                else "no cgroup v2 mount"
            ),
            "" if cg else "mount it (mount -t cgroup2 none /sys/fs/cgroup/unified); " + WITHOUT_BPF,
        )
    )
    tr = os.path.isdir(os.path.join(TRACEFS, "events"))  # reported only: sockwatch mounts nothing
    out.append(
        Check(
            "tracefs",
            tr,
            f"tracefs at {TRACEFS}" if tr else "tracefs is not mounted",
            "" if tr else "not required: sockwatch reads its one tracepoint's id in a private mount namespace",
        )
    )
    hd = headers_dir()
    out.append(
        Check(
            "headers",
            hd is not None,
            f"kernel headers at {hd}" if hd else f"no kernel headers for {platform.release()}",
            "" if hd else INSTALL_HINT + "; " + WITHOUT_BPF,
        )
    )
    return out


def require(names: tuple[str, ...] = ("root", "bpf", "bcc", "cgroup2", "headers")) -> None:
    """Raise PrereqError for the first failed check among `names`."""
    for c in checks():
        if c.name in names and not c.ok:
            raise PrereqError(c.detail, c.fix)


def require_root() -> None:
    if os.geteuid() != 0:
        raise PrereqError(
            "sockwatch needs root to read every process's sockets and other network namespaces",
            "run it with sudo",
        )
