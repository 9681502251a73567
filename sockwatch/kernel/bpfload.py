"""Compile bpf/*.c with bcc, check the shared structs, attach every program through a
BPF link, and give the agent the maps and the ring buffer.

Links (BPF_LINK_CREATE), never BPF_PROG_ATTACH: a link belongs to its file descriptor,
so the kernel detaches every program when sockwatch exits, even on SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockwatch.kernel import abi, drops, lookup, prereq, syscalls
from sockwatch.kernel.links import Link, Links, Target
from sockwatch.kernel.netns import NamespaceGone, NamespaceRegistry
from sockwatch.kernel.ringbuf import RingReader
from sockwatch.kernel.syscalls import libbpf, link_create

if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-bpfcc

_CHECKOUT = Path(__file__).resolve().parents[2]
BPF_DIR = _CHECKOUT / "bpf"
if not ((_CHECKOUT / "pyproject.toml").is_file() and (BPF_DIR / "sockwatch.h").is_file()):
    BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"  # installed from a wheel: sockwatch/bpf/

# enum bpf_attach_type (uapi/linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_INET4_POST_BIND = 12
BPF_CGROUP_INET6_POST_BIND = 13
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET_SOCK_RELEASE = 34
BPF_PERF_EVENT = 41
BPF_TRACE_RAW_TP = 23


IPPROTO_TCP, IPPROTO_UDP = 6, 17


# When a hook is attached. STREAMING: only while someone streams events (it runs for
# every socket, or every connect(), and what it tells a view reads from the kernel
# anyway); STREAMING_WITH_OWNERS: so where sockops names a connect()'s owner (6.2 and
# later), always where it cannot (connect4/6 then log the owner for it).
ALWAYS, STREAMING, STREAMING_WITH_OWNERS = "always", "streaming", "streaming with owners"


@dataclass(frozen=True)
class Hook:
    func: str
    prog_type: str  # attribute name of bcc.BPF
    attach_type: int
    what: str
    feeds: tuple[int, ...]  # the protocols whose rows go stale without it
    tracepoint: str = ""  # "category/name" (a raw one: "name") for a tracepoint program (else a cgroup one)
    without: str = "failed binds are not in the event stream"  # for hooks that feed no rows
    fallback: str = ""  # a lesser variant to load where the kernel refuses func
    fallback_note: str = ""  # what the variant lacks
    when: str = ALWAYS  # ALWAYS, STREAMING, or STREAMING_WITH_OWNERS

    @property
    def effect(self) -> str:
        """What sockwatch cannot do without this hook."""
        if self.feeds:
            return unwatched_effect(self.feeds)
        return self.without


# No hook runs at every socket's creation, nor, while nobody streams, at its close or at
# a connect(): UDP sockets, listeners and connections are read from the kernel when a
# view asks. sockops comes before connect4/6: whether it names owners decides theirs.
HOOKS = (
    Hook("sw_post_bind4", "CGROUP_SOCK", BPF_CGROUP_INET4_POST_BIND, "cgroup post_bind4 (binds)", (IPPROTO_UDP,)),
    Hook("sw_post_bind6", "CGROUP_SOCK", BPF_CGROUP_INET6_POST_BIND, "cgroup post_bind6 (binds)", (IPPROTO_UDP,)),
    Hook("sw_sockops", "SOCK_OPS", BPF_CGROUP_SOCK_OPS, "sockops (TCP listen/connect/accept/state)",
         (IPPROTO_TCP,), fallback="sw_sockops_no_owner",
         fallback_note="sockops cannot read the current task on this kernel (before 6.2): a TCP socket's owner "
                       "comes from its bind() or connect(), a listen() without bind() has its owner from /proc "
                       "when a view asks"),
    Hook("sw_connect4", "CGROUP_SOCK_ADDR", BPF_CGROUP_INET4_CONNECT, "cgroup connect4 (UDP connects)", (),
         without="UDP connects are not streamed", when=STREAMING_WITH_OWNERS),
    Hook("sw_connect6", "CGROUP_SOCK_ADDR", BPF_CGROUP_INET6_CONNECT, "cgroup connect6 (UDP connects)", (),
         without="UDP connects are not streamed", when=STREAMING_WITH_OWNERS),
    Hook("sw_sock_release", "CGROUP_SOCK", BPF_CGROUP_INET_SOCK_RELEASE, "cgroup sock_release (closes)", (),
         without="UDP closes are not streamed", when=STREAMING),
    Hook("sw_bind4", "CGROUP_SOCK_ADDR", BPF_CGROUP_INET4_BIND, "cgroup bind4 (what bind() asked)", ()),
    Hook("sw_bind6", "CGROUP_SOCK_ADDR", BPF_CGROUP_INET6_BIND, "cgroup bind6 (what bind() asked)", ()),
    Hook("sw_bind_exit", "TRACEPOINT", BPF_PERF_EVENT, "tracepoint sys_exit_bind (bind errno)", (),
         "syscalls/sys_exit_bind"),
    Hook("sw_lookup_miss", "RAW_TRACEPOINT", BPF_TRACE_RAW_TP, "raw tracepoint kfree_skb (lookup misses)", (),
         "kfree_skb", "lookups that find no socket (closed ports) are not counted"),
)  # fmt: skip


def at_start(tcp_owners: bool = True) -> tuple[Hook, ...]:
    """The hooks attached for the agent's lifetime (`tcp_owners`: sockops names owners)."""
    return tuple(h for h in HOOKS if h.when == ALWAYS or (h.when == STREAMING_WITH_OWNERS and not tcp_owners))


def links_at_start(tcp_owners: bool = True) -> int:
    """The links an agent holds for its lifetime besides sk_lookup's (one per namespace):
    the hooks at_start, and the drop hook (DROP_HOOK, which sockwatch loads itself)."""
    return len(at_start(tcp_owners)) + 1


def later(tcp_owners: bool = True) -> tuple[Hook, ...]:
    """The hooks attached only while someone streams (the rest of HOOKS)."""
    start = at_start(tcp_owners)
    return tuple(h for h in HOOKS if h not in start)


# Loaded by sockwatch itself as a BTF tracepoint program (kernel/drops.py).
DROP_HOOK = Hook(
    "sw_drop",
    "TRACING",
    drops.BPF_TRACE_RAW_TP,
    drops.WHAT,
    (),
    "kfree_skb",
    "drops are shown per socket as totals (the kernel's sk_drops), without their reasons",
)

# Attached to each network namespace, not to the cgroup (kernel/lookup.py).
LOOKUP_HOOK = Hook("sw_lookup", "SK_LOOKUP", 36, lookup.WHAT, (), "", "lookups, misses and UDP peers are not counted")


def unwatched_effect(protocols: tuple[int, ...]) -> str:
    names = " and ".join({IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP"}[p] for p in protocols)
    return f"{names} rows are read from the kernel at each query, as ss does, and their changes are not streamed"


@dataclass(frozen=True)
class Missing:
    """A hook this kernel would not load or attach: sockwatch runs without it."""

    hook: Hook
    why: str


class LoadError(RuntimeError):
    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


def source_text() -> str:
    """sockwatch.bpf.c with its *.bpf.c includes inlined (bcc rewrites tracepoint
    arguments only in the main text)."""
    main = (BPF_DIR / "sockwatch.bpf.c").read_text()
    return re.sub(r'#include "(\w+\.bpf\.c)"', lambda m: (BPF_DIR / m.group(1)).read_text(), main)


@dataclass
class Loaded:
    bpf: Any  # bcc.BPF
    links: Links = field(default_factory=Links)
    lookup: lookup.LookupHook | None = None  # None: refused (see .missing) or turned off
    lookups_off: bool = False  # serve --lookups off
    cgroup_fd: int = -1
    cgroup_path: str = ""
    ring: RingReader | None = None
    missing: list[Missing] = field(default_factory=list)
    lesser: list[str] = field(default_factory=list)  # hooks loaded as their fallback variant: what they lack
    tcp_owners: bool = True  # False: sockops cannot read the task (its variant without owners)
    streamed: list[Link] = field(default_factory=list)  # the STREAMING hooks' links, while someone streams
    map_fds: list[int] = field(default_factory=list)  # ours once bcc's module is released (release_module)
    owner_logs: abi.OwnerLogs = field(default_factory=abi.OwnerLogs)  # the owner_logs as last read
    drop_reasons: dict[str, int] = field(default_factory=dict)  # this kernel's drop reasons' numbers
    drop_counts: drops.DropCounts | None = None  # None: the drop hook is missing (see .missing)

    @property
    def unwatched(self) -> tuple[int, ...]:
        """Protocols some missing hook feeds: their rows are read from the kernel."""
        return tuple(sorted({p for m in self.missing for p in m.hook.feeds}))

    def degraded(self) -> str:
        """One sentence on what runs without the missing hooks, or ''."""
        if not self.missing:
            return ""
        effects = [unwatched_effect(self.unwatched)] if self.unwatched else []
        effects += sorted({m.hook.effect for m in self.missing if not m.hook.feeds})
        return f"degraded: this kernel refused {', '.join(m.hook.what for m in self.missing)}; " + "; ".join(effects)

    def counters(self) -> dict[str, int]:
        table = self.bpf["counters"]
        return {name: int(sum(table.getvalue(table.Key(i)))) for i, name in enumerate(abi.COUNTER_NAMES)}

    def recent_owners(self) -> dict[int, int]:
        """cookie -> pid of the TCP connect()s still in the CPUs' owner_logs."""
        table = self.bpf["owner_log"]
        lib = libbpf()
        buf = ctypes.create_string_buffer(abi.OWNER_LOG_SIZE)
        for cpu in range(len(table)):
            key = ctypes.c_uint32(cpu)
            if lib.bpf_map_lookup_elem(table.map_fd, ctypes.byref(key), buf) == 0:
                self.owner_logs.update(cpu, buf.raw)
        return self.owner_logs.owners()

    def set_stream(self, on: bool) -> None:
        """Connection records reach the ring only while someone streams them."""
        self.set_config(abi.SW_CFG_STREAM, int(on))

    def stream_hooks(self, on: bool) -> list[str]:
        """Attach (or detach) the hooks only a stream needs; what the kernel refused."""
        if not on:
            while self.streamed:
                self.links.remove(self.streamed.pop())
            return []
        if self.streamed or self.cgroup_fd < 0:
            return []
        refused = []
        for h in later(self.tcp_owners):
            try:
                fd = attach_one(self.bpf, h, self.cgroup_fd)
            except OSError as e:
                refused.append(f"{h.what}: {e.strerror or e}")
                continue
            self.streamed.append(self.links.add(fd, h.what, Target("cgroup", self.cgroup_path)))
        return refused

    def set_config(self, index: int, value: int) -> None:
        table = self.bpf["config"]
        table[table.Key(index)] = table.Leaf(value)

    def open_ring(self, pages: int) -> RingReader:
        self.ring = RingReader(self.bpf["events"].map_fd, pages * os.sysconf("SC_PAGE_SIZE"))
        return self.ring

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.links.close()
        if self.cgroup_fd >= 0:
            os.close(self.cgroup_fd)
            self.cgroup_fd = -1
        self.bpf.cleanup()
        while self.map_fds:
            os.close(self.map_fds.pop())

    def release_module(self) -> bool:
        """Free bcc's compiler state (its LLVM module and JIT: ~35 MiB the agent never
        uses again) once everything it will need is made: each program a stream may
        attach later is loaded now, each map's table object is made and its fd made ours
        (the module closes its own). Afterwards bcc can make no new table or program
        from this module: asking for one raises (KeyError, or a refusal stream_hooks
        reports), never reaches the freed module. False where bcc lacks what it needs."""
        from bcc import lib

        b = self.bpf
        if not b.module or not hasattr(lib, "bpf_num_tables"):
            return False
        for h in later(self.tcp_owners):
            try:
                load_one(b, h)
            except OSError:
                pass  # refused now, refused when a stream asks (the same kernel): said then
        lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
        lib.bpf_num_tables.restype = ctypes.c_size_t
        lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.bpf_table_name.restype = ctypes.c_char_p
        names = [lib.bpf_table_name(b.module, i).decode() for i in range(lib.bpf_num_tables(b.module))]
        fds = sorted({b[name].map_fd for name in names})
        held = [os.dup(fd) for fd in fds]
        lib.bpf_module_destroy(b.module)  # closes fds
        b.module = None
        for fd, dup in zip(fds, held, strict=True):
            # the same numbers again: programs loaded later (sk_lookup's per-namespace
            # copies) name maps by the fd numbers compiled into them (single-threaded here)
            os.dup2(dup, fd)
            os.close(dup)
        self.map_fds = fds
        loaded_funcs = b.funcs

        def no_table(name: Any, *_args: Any, **_kw: Any) -> Any:
            raise KeyError(f"no BPF map {name!r} (made after bcc's module was released)")

        def only_loaded(name: Any, *_args: Any, **_kw: Any) -> Any:
            key = name.encode() if isinstance(name, str) else name
            if key in loaded_funcs:
                return loaded_funcs[key]
            raise Exception(f"{key.decode()} was not loaded before bcc's module was released")

        b.get_table = no_table
        b.load_func = only_loaded
        return True


MADV_PAGEOUT = 21  # Linux 5.4+


def release_compiler_pages() -> int:
    """Once the programs are loaded, clang and LLVM (~120 MiB of code bcc links in) are not
    run again: ask the kernel to reclaim their pages from this process (MADV_PAGEOUT,
    read-only file mappings only, so nothing is lost: a page used again faults back in
    from the library file). Returns how many mappings were advised; 0 where unsupported."""
    done = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or "w" in fields[1] or not re.search(r"/lib(LLVM|clang|bcc)[^/]*$", fields[5]):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if syscalls.madvise(start, end - start, MADV_PAGEOUT):
            done += 1
    return done


@dataclass(frozen=True)
class Sizes:
    """What the maps are sized for (serve's flags)."""

    ringbuf_pages: int = 1024
    max_lookup_keys: int = 16384
    max_udp_peers: int = 16384


def possible_cpus() -> int:
    """How many CPU numbers this kernel may use (bpf_get_smp_processor_id is below it)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def compile_programs(sizes: Sizes = Sizes(), reasons: dict[str, int] | None = None,
                     defines: tuple[str, ...] = ()) -> Any:  # fmt: skip
    """Compile with bcc and check struct sizes; raises LoadError with a remedy.
    `reasons`: this kernel's drop reasons' numbers (drop_reasons()); `defines`: more -D
    flags (benchmarks' variants). Callers have run prereq.require() (or doctor's
    checks) first."""
    reasons = reasons or {}
    no_socket = reasons.get("NO_SOCKET")
    lo, hi = drops.masks(reasons)
    from bcc import BPF

    cflags = [
        f"-I{BPF_DIR}",
        f"-DSW_RINGBUF_PAGES={sizes.ringbuf_pages}",
        f"-DSW_MAX_LOOKUP_KEYS={sizes.max_lookup_keys}",
        f"-DSW_MAX_UDP_PEERS={max(1, sizes.max_udp_peers)}",
        f"-DSW_NCPUS={possible_cpus()}",
        f"-DSW_DROP_MASK_LO={lo:#x}ULL",
        f"-DSW_DROP_MASK_HI={hi:#x}ULL",
        "-w",
        *(f"-D{d}" for d in defines),
    ]
    if not sizes.max_udp_peers:
        cflags.append("-DSW_NO_PEERS")
    if no_socket is not None:
        cflags.append(f"-DSW_DROP_NO_SOCKET={no_socket}")  # fmt: skip
    try:
        with _quiet():  # clang's chatter about the headers is not for users
            b = BPF(text=source_text(), cflags=cflags)
    except Exception as e:
        raise LoadError(
            f"bcc could not compile sockwatch's BPF programs ({e})",
            "check the kernel headers with 'sockwatch doctor'; " + prereq.INSTALL_HINT,
        ) from None
    abi.check_sizes(
        {
            "sw_event": ctypes.sizeof(b["abi_event"].Leaf),
            "sw_bind": ctypes.sizeof(b["abi_bind"].Leaf),
            "sw_owner_slot": ctypes.sizeof(b["abi_owner_slot"].Leaf),
            "sw_lookup_key": ctypes.sizeof(b["abi_lookup_key"].Leaf),
            "sw_lookup_count": ctypes.sizeof(b["lookup_counts"].sLeaf),
            "sw_peer_key": ctypes.sizeof(b["abi_peer_key"].Leaf),
            "sw_peer_count": ctypes.sizeof(b["udp_peers"].sLeaf),
            "sw_lookup_cached": ctypes.sizeof(b["abi_lookup_cached"].Leaf),
            "sw_peer_cached": ctypes.sizeof(b["abi_peer_cached"].Leaf),
            "sw_drop_key": ctypes.sizeof(b["abi_drop_key"].Leaf),
        }
    )
    return b


TRACING_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_text(rel: str) -> str:
    """A file of tracefs. Where tracefs is not mounted, it is mounted in a private mount
    namespace of a short-lived child: the host's mounts are never changed. OSError if
    there is no such file."""
    got = tracefs_texts((rel,)).get(rel)
    if got is None:
        raise OSError(errno.ENOENT, f"{rel} not found in tracefs (is tracefs available?)")
    return got


_from_private_mount: dict[str, str] = {}  # what a child read where tracefs is not mounted


def tracefs_texts(rels: tuple[str, ...]) -> dict[str, str]:
    """The files of tracefs that exist among `rels`; where tracefs is not mounted, all of
    them are read by one child (start-up asks for two: one spawn, not two)."""
    out: dict[str, str] = {}
    for rel in rels:
        for d in TRACING_DIRS:
            try:
                with open(os.path.join(d, rel)) as f:
                    out[rel] = f.read()
                break
            except OSError:
                continue
    wanted = [rel for rel in rels if rel not in out and rel not in _from_private_mount]
    if wanted:
        script = ('mount -t tracefs nodev /sys/kernel/tracing || exit 1; for f; do '
                  'if [ -r "/sys/kernel/tracing/$f" ]; then printf "%s\\0" "$f"; cat "/sys/kernel/tracing/$f"; '
                  'printf "\\0"; fi; done')  # fmt: skip
        try:
            r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *wanted],
                               capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
            parts = r.stdout.split("\0") if r.returncode == 0 else []
            _from_private_mount.update(zip(parts[0::2], parts[1::2], strict=False))  # a trailing ""
        except (OSError, subprocess.SubprocessError):
            pass
    out.update((rel, _from_private_mount[rel]) for rel in rels if rel not in out and rel in _from_private_mount)
    return out


def tracepoint_id(tracepoint: str) -> int:
    """The id perf_event_open needs."""
    try:
        return int(tracefs_text(f"events/{tracepoint}/id"))
    except (OSError, ValueError):
        raise OSError(errno.ENOENT, f"tracepoint {tracepoint} not found (is tracefs available?)") from None


KFREE_SKB_FORMAT = "events/skb/kfree_skb/format"


def kfree_skb_format() -> str:
    """skb:kfree_skb's format file ('' if unreadable). The first tracefs read of a start:
    the tracepoints' ids are read with it (see tracefs_texts)."""
    ids = tuple(f"events/{h.tracepoint}/id" for h in HOOKS if h.prog_type == "TRACEPOINT")
    return tracefs_texts((KFREE_SKB_FORMAT, *ids)).get(KFREE_SKB_FORMAT, "")


def drop_reasons() -> dict[str, int]:
    """This kernel's drop reasons by name, with their numbers (empty where drops carry no
    reason)."""
    return drops.reason_numbers(kfree_skb_format())


PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8


def perf_tracepoint_fd(tp_id: int) -> int:
    """A perf event on the tracepoint (pid -1, CPU 0: a BPF program on a tracepoint runs
    on every CPU), for BPF_LINK_CREATE to attach to."""
    attr = bytearray(112)  # PERF_ATTR_SIZE_VER5
    struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, len(attr), tp_id, 1)  # sample_period 1
    struct.pack_into("<I", attr, 48, 1)  # wakeup_events
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    return syscalls.syscall("perf_event_open", buf, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """bcc prints the verifier's whole log to fd 2 when a load fails: not for users when a
    lesser variant follows (the exception keeps the log's first line)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def forced_lesser() -> set[str]:
    """Hooks to load as their lesser variant, as an older kernel would make sockwatch do
    (SOCKWATCH_LESSER=sw_sockops: 6.1's sockops without owners; sw_drop: no drop hook,
    as before 6.11), so that the tests run those paths on any kernel. Not for
    production: it only takes information away."""
    return {f for f in os.environ.get("SOCKWATCH_LESSER", "").split(",") if f}


def load_one(b: Any, h: Hook, lesser: list[str] | None = None) -> Any:
    """Load `h` (or, where the kernel refuses it, its fallback variant, said in
    `lesser`): bcc's loaded function. Raises OSError with what the kernel said."""
    from bcc import BPF

    def load(func: str) -> Any:
        try:
            with _quiet() if h.fallback and func == h.func else contextlib.nullcontext():
                return b.load_func(func, getattr(BPF, h.prog_type),
                                   attach_type=h.attach_type if not h.tracepoint else -1)  # fmt: skip
        except Exception as e:  # bcc raises a bare Exception with the verifier's words
            first = (str(e).splitlines() or ["refused"])[0]
            raise OSError(0, f"the kernel would not load it ({first})") from None

    try:
        if h.func in forced_lesser() and h.fallback:
            raise OSError(0, "SOCKWATCH_LESSER asks for the lesser variant")
        return load(h.func)
    except OSError:
        if not h.fallback:
            raise
        fn = load(h.fallback)
        if lesser is not None:
            lesser.append(f"{h.what}: {h.fallback_note}")
        return fn


def attach_one(b: Any, h: Hook, cgroup_fd: int, lesser: list[str] | None = None) -> int:
    """Load `h` (load_one) and attach it by link (to the cgroup, or to a perf event on
    its tracepoint); the link's fd. Raises OSError with what the kernel said."""
    fn = load_one(b, h, lesser)
    if h.prog_type == "RAW_TRACEPOINT":
        fd = libbpf().bpf_raw_tracepoint_open(h.tracepoint.encode(), fn.fd)  # its fd is a link
        if fd < 0:
            err = -fd if fd < -1 else ctypes.get_errno()
            raise OSError(err, f"the kernel would not attach it ({os.strerror(err)})")
        return int(fd)
    target = cgroup_fd
    try:
        if h.tracepoint:
            target = perf_tracepoint_fd(tracepoint_id(h.tracepoint))
        return link_create(fn.fd, target, h.attach_type)
    except OSError as e:
        raise OSError(e.errno, f"the kernel would not attach it by BPF link ({e.strerror})") from None
    finally:
        if target != cgroup_fd:
            os.close(target)  # the link holds the perf event


def load_drop_sites(b: Any) -> bool:
    """Tell the miss program where the kernel drops a packet for no socket (from
    /proc/kallsyms); where addresses are hidden, any site counts. True if checked."""
    sites = lookup.drop_sites(_read("/proc/kallsyms"))
    table = b["drop_sites"]
    for i, (start, end) in enumerate(sites or [(0, 2**64 - 1)]):  # hidden addresses: any site
        table[table.Key(i)] = table.Leaf(start, end)
    return bool(sites)


def attach_lookup(loaded: Loaded, registry: NamespaceRegistry) -> None:
    """The sk_lookup hook, attached to sockwatch's own namespace (the agent's tick
    follows every other one). Where the kernel refuses it, it is listed in .missing."""
    try:
        loaded.lookup = lookup.LookupHook(loaded.bpf, loaded.links)
        loaded.lookup.drop_sites_checked = load_drop_sites(loaded.bpf)
        own = registry.own()
        if own is None:
            raise OSError(errno.ENOENT, "sockwatch's own network namespace could not be read")
        loaded.lookup.attach(own, registry)
    except (OSError, lookup.TemplateError, NamespaceGone) as e:
        loaded.lookup = None
        loaded.missing.append(Missing(LOOKUP_HOOK, getattr(e, "strerror", None) or str(e)))


def attach_drops(loaded: Loaded) -> None:
    """The per-socket drop hook (drops.bpf.c). Where the kernel refuses it, or names none
    of the reasons, it is listed in .missing: each socket's drop total (sock_diag's
    sk_drops) is still shown, without reasons."""
    why = ""
    if DROP_HOOK.func in forced_lesser():
        why = "SOCKWATCH_LESSER asks for a kernel without it"
    elif drops.masks(loaded.drop_reasons) == (0, 0):
        why = f"this kernel's kfree_skb tracepoint names none of {', '.join(drops.REASONS)}"
    elif not re.search(r"\brx_sk\b", kfree_skb_format()):
        why = "this kernel's kfree_skb tracepoint does not name the socket (rx_sk: Linux 6.11 and later)"
    if why:
        loaded.missing.append(Missing(DROP_HOOK, why))
        return
    try:
        fd = drops.attach(bytes(loaded.bpf.dump_func("sw_drop")))
    except OSError as e:
        loaded.missing.append(Missing(DROP_HOOK, e.strerror or str(e)))
        return
    loaded.links.add(fd, DROP_HOOK.what, Target("tracing", "kfree_skb"))
    loaded.drop_counts = drops.DropCounts(loaded.bpf, loaded.drop_reasons)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def load_and_attach(sizes: Sizes, registry: NamespaceRegistry, lookups: bool = True) -> Loaded:
    """Every hook this kernel takes, attached; close() (or process exit) detaches them.
    A hook the kernel refuses is listed in .missing and the protocols it feeds in
    .unwatched (degraded: the agent reads those from the kernel when asked); none at all
    is a LoadError. `lookups` False leaves the sk_lookup and miss programs out. Callers
    have run prereq.require() first."""
    reasons = drop_reasons()
    no_socket = reasons.get("NO_SOCKET")
    b = compile_programs(sizes, reasons)
    loaded = Loaded(bpf=b, lookups_off=not lookups, drop_reasons=reasons)
    cg = prereq.cgroup2_path()
    assert cg is not None  # prereq.require checked it
    loaded.cgroup_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    loaded.cgroup_path = cg
    try:
        for h in HOOKS:
            if h not in at_start(loaded.tcp_owners):
                continue  # attached while someone streams
            if h.func == "sw_lookup_miss" and not lookups:
                continue
            if h.func == "sw_lookup_miss" and no_socket is None:
                loaded.missing.append(Missing(h, "this kernel's kfree_skb tracepoint has no drop reason"))
                continue
            lesser = len(loaded.lesser)
            try:
                fd = attach_one(b, h, loaded.cgroup_fd, loaded.lesser)
            except OSError as e:
                loaded.missing.append(Missing(h, e.strerror or str(e)))
                continue
            if h.func == "sw_sockops" and len(loaded.lesser) > lesser:
                # before connect4/6 (HOOKS' order): they attach now, and log TCP connect()s' owners
                loaded.set_config(abi.SW_CFG_CONNECT_OWNER, 1)
                loaded.tcp_owners = False
            target = Target(h.prog_type.lower(), h.tracepoint) if h.tracepoint else Target("cgroup", cg)
            loaded.links.add(fd, h.what, target)
        if lookups:
            attach_lookup(loaded, registry)
        attach_drops(loaded)
        if not len(loaded.links):
            raise LoadError(
                f"the kernel refused every sockwatch hook ({loaded.missing[0].hook.what}: {loaded.missing[0].why})",
                f"run 'sockwatch doctor'; {prereq.WITHOUT_BPF}",
            )
        loaded.release_module()
    except BaseException:
        loaded.close()
        raise
    return loaded
