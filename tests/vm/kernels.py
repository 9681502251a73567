"""Boot other kernels under QEMU (software emulation: no KVM here) with this machine's
filesystem, and run sockwatch's kernel tests inside each.

For each kernel: Debian's image package (and its headers, where this machine has
none) is fetched with apt into /var/cache/sockwatch-kernels and unpacked there; a small
busybox initramfs loads 9p (and virtio, where the kernel has it as modules), mounts
this machine's root read-only over 9p, gives it writable tmpfs where the tests write
(/tmp, /run, /var/tmp), the kernel's own modules and headers under /lib/modules, the
kernel file systems (cgroup2, bpf, tracefs), and runs the command in a chroot there.
The guest prints `SW-EXIT <status>` and powers off. Nothing of this machine is changed
(its root is mounted read-only in the guest; the cache is sockwatch's own).

  scripts/kernels.sh                       # 6.1, 6.12 and this machine's: doctor, then the
                                           # namespace, table and lookup tests
  scripts/kernels.sh --kernel 6.1 --full       # every kernel test but the benchmarks (~45 min)
  scripts/kernels.sh --kernel 6.1 -- tests/kernel/test_table.py -k reuseport
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import io
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("SOCKWATCH_KERNEL_CACHE", "/var/cache/sockwatch-kernels"))
SERIES = {"6.1": r"linux-image-(6\.1\.0-\d+-amd64)", "6.12": r"linux-image-(6\.12\.\d+\+deb12-amd64)"}
# the 9p root and what it needs, in load order (built in on some kernels: then absent)
# and the socket diagnostics sockwatch reads (a Debian host loads them on demand through
# modprobe; this machine has no kmod to lend the guest)
BOOT_MODULES = ("virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
                "netfs", "9pnet", "9pnet_virtio", "9p", "inet_diag", "tcp_diag", "udp_diag", "veth")  # fmt: skip
# a subset of the kernel tests that fits software emulation's pace (each agent start compiles)
DEFAULT_TESTS = ("tests/kernel/test_netns.py", "tests/kernel/test_table.py", "tests/kernel/test_lookup.py",
                 "tests/kernel/test_drops.py", "tests/kernel/test_explain_bind.py")  # fmt: skip
# --full: the whole kernel suite but this runner's own test and the benchmarks, whose
# figures under software emulation measure the emulator, not the kernel
FULL_TESTS = ("tests/kernel", "--ignore=tests/kernel/test_vm.py", "--ignore=tests/kernel/test_cost_bench.py",
              "--ignore=tests/kernel/test_churn_bench.py", "--ignore=tests/kernel/test_lookup_bench.py",
              "-m", "not slow")  # fmt: skip


@dataclass
class Kernel:
    version: str
    root: Path  # the unpacked packages

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    def headers(self) -> tuple[Path, Path]:
        """(build, source): the arch headers and the common ones, this machine's if it
        has them, else the unpacked packages'."""
        for base in (Path("/usr/src"), self.root / "usr" / "src"):
            build = base / f"linux-headers-{self.version}"
            if build.is_dir():
                common = sorted(base.glob(f"linux-headers-{self.version.rsplit('-', 1)[0]}-common"))
                common = common or sorted(base.glob(f"linux-headers-{self.version.split('-')[0]}*common*"))
                return build, common[0] if common else build
        raise SystemExit(f"kernels: no headers for {self.version}")


def say(msg: str) -> None:
    print(f"kernels: {msg}", file=sys.stderr, flush=True)


def newest(series: str) -> str:
    out = subprocess.run(["apt-cache", "search", "--names-only", "^linux-image-"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    found = {m.group(1) for m in re.finditer(SERIES[series] + r" ", out)}
    if not found:
        raise SystemExit(f"kernels: apt offers no {series} kernel")
    return max(found, key=lambda v: [int(x) for x in re.findall(r"\d+", v)])


def fetch(version: str) -> Kernel:
    root = CACHE / version / "root"
    k = Kernel(version, root)
    if k.vmlinuz.exists():
        return k
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    os.chmod(dl, 0o755)  # apt downloads as its own user where it can
    pkgs = [f"linux-image-{version}"]
    if not Path(f"/usr/src/linux-headers-{version}").is_dir():
        common = version.rsplit("-", 1)[0] + "-common"
        pkgs += [f"linux-headers-{version}", f"linux-headers-{common}"]
    say(f"fetching {' '.join(pkgs)}")
    subprocess.run(["apt-get", "download", "-q", *pkgs], cwd=dl, check=True, stdout=subprocess.DEVNULL)
    tmp = CACHE / version / "root.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in pkgs:
        deb = sorted(dl.glob(f"{glob.escape(p)}_*.deb"))
        if not deb:
            raise SystemExit(f"kernels: apt did not download {p}")
        subprocess.run(["dpkg-deb", "-x", str(deb[-1]), str(tmp)], check=True)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return k


# ---- the initramfs ------------------------------------------------------------------------


def _module_file(k: Kernel, name: str) -> Path | None:
    hits = [p for p in k.modules.rglob(f"{name}.ko*") if p.name.split(".ko")[0] == name]
    return hits[0] if hits else None


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


def _depends(ko: bytes) -> list[str]:
    m = re.search(rb"\0depends=([^\0]*)\0", ko)
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def boot_modules(k: Kernel) -> list[tuple[str, bytes]]:
    """The modules the 9p root needs, dependencies first (from each module's own
    `depends=`); those built into this kernel are simply not found."""
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = _module_file(k, name) or _module_file(k, name.replace("_", "-"))
        if path is None:
            return  # built in
        data = _module_bytes(path)
        for d in _depends(data):
            add(d)
        out.append((name, data))

    for name in BOOT_MODULES:
        add(name)
    return out


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod /mods/$m.ko || echo "SW-NOTE insmod $m failed"; done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
  || { echo SW-EXIT 90; poweroff -f; }
. "/host$SW_ENV"
mkdir -p /keep; mount -o bind "/host$SW_REPO" /keep  # the repository, should a tmpfs below hide it
for d in tmp run var/tmp root; do mount -t tmpfs tmpfs /host/$d; done
[ -d "/host$SW_REPO" ] || { mkdir -p "/host$SW_REPO"; mount -o bind /keep "/host$SW_REPO"; }
chmod 1777 /host/tmp /host/var/tmp
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm  # a fresh devtmpfs has neither; tmux needs ptys
mount -t devpts -o ptmxmode=0666 devpts /host/dev/pts; mount -t tmpfs tmpfs /host/dev/shm
ulimit -n 32768  # the kernel's default 1024 is below what a systemd host gives
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup; mount -t bpf bpf /host/sys/fs/bpf
mount -t tracefs tracefs /host/sys/kernel/tracing; mount -t debugfs debugfs /host/sys/kernel/debug
V=$(uname -r)
mount -t tmpfs tmpfs /host/lib/modules; mkdir -p /host/lib/modules/$V
for f in /host$SW_MODULES/*; do ln -s "${f#/host}" /host/lib/modules/$V/; done
rm -f /host/lib/modules/$V/build /host/lib/modules/$V/source
ln -s "$SW_BUILD" /host/lib/modules/$V/build; ln -s "$SW_SOURCE" /host/lib/modules/$V/source
mkdir -p /host/run/netns
echo SW-BOOTED $V
chroot /host /bin/sh -c 'ip link set lo up; cd "$SW_REPO" && exec sh -c "$SW_CMD"'
echo "SW-EXIT $?"
poweroff -f
"""


def _cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc archive of {path: (mode, data)} (directories: data b"")."""
    out = io.BytesIO()
    ino = 1
    for name, (mode, data) in [*files.items(), ("TRAILER!!!", (0, b""))]:
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{x:08x}" for x in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0))
        out.write(hdr.encode() + nm + b"\0" * ((-(110 + len(nm))) % 4) + data + b"\0" * ((-len(data)) % 4))
        ino += 1
    return out.getvalue()


def initramfs(k: Kernel, path: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    files: dict[str, tuple[int, bytes]] = {}
    for d in ("bin", "dev", "proc", "sys", "mods", "host", "keep"):
        files[d] = (stat.S_IFDIR | 0o755, b"")
    files["bin/busybox"] = (stat.S_IFREG | 0o755, Path(busybox).read_bytes())
    mods = boot_modules(k)
    for name, data in mods:
        files[f"mods/{name}.ko"] = (stat.S_IFREG | 0o644, data)
    files["modules"] = (stat.S_IFREG | 0o644, "\n".join(n for n, _ in mods).encode() + b"\n")
    files["init"] = (stat.S_IFREG | 0o755, INIT.encode())
    path.write_bytes(gzip.compress(_cpio(files), 1))


# ---- booting ------------------------------------------------------------------------------


@dataclass
class Run:
    kernel: str
    booted: bool
    status: int | None
    seconds: float
    output: str


def boot(k: Kernel, command: str, timeout: float, log: Path, memory: str = "3G") -> Run:
    work = CACHE / k.version
    rd = work / "initrd.gz"
    initramfs(k, rd)
    build, source = k.headers()
    env = {"SW_CMD": command, "SW_REPO": str(ROOT), "SW_MODULES": str(k.modules), "SW_BUILD": str(build),
           "SW_SOURCE": str(source)}  # fmt: skip
    # the init's environment comes from the kernel command line (quoted words are not
    # split by the kernel, but spaces are): the command goes through a file instead
    cmdfile = work / f"command-{os.getpid()}.sh"  # this run's: another run may boot the same kernel
    cmdfile.write_text("".join(f"export {k_}={_sh(v)}\n" for k_, v in env.items()))
    append = f"console=ttyS0 quiet panic=-1 rdinit=/init SW_ENV={cmdfile}"
    qemu = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", memory,
            "-nographic", "-no-reboot", "-kernel", str(k.vmlinuz), "-initrd", str(rd), "-append", append,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]  # fmt: skip
    try:
        out, _status, took = _timed(qemu, timeout, log)
    finally:
        cmdfile.unlink()
    m = re.search(r"SW-EXIT (\d+)", out)
    return Run(k.version, "SW-BOOTED" in out, int(m.group(1)) if m else None, took, out)


def run_here(command: str, timeout: float, log: Path) -> Run:
    """The same command on this machine's own kernel, for the table's last row."""
    out, status, took = _timed(["sh", "-c", command], timeout, log, cwd=ROOT)
    return Run(f"{os.uname().release} (here)", True, status, took, out)


def _timed(cmd: list[str], timeout: float, log: Path, cwd: Path | None = None) -> tuple[str, int | None, float]:
    """(output, exit status or None if it timed out, seconds) of one run. The output goes
    to the log as it comes (`tail -f` it: a whole suite takes most of an hour under TCG);
    the run has its own process group, killed whole on a timeout or if we are stopped."""
    t0 = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    status: int | None = None
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            f.write(b"\nkernels: timed out\n")
        finally:
            if status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return log.read_text(errors="replace"), status, time.monotonic() - t0


def test_command(tests: tuple[str, ...] | list[str], guest: bool) -> str:
    """What runs in a guest (or here): doctor, then pytest on `tests` with this
    environment's interpreter (the guest sees it through 9p). A test's limits (pyproject:
    300 s each; its waits for the agent) are for this machine's pace; a guest's is ~10x
    slower (tests/conftest.py PACE)."""
    py = sys.executable
    pace = "export SOCKWATCH_TEST_PACE=10 SOCKWATCH_BIND_EXAMPLES=30; " if guest else ""
    limit = "-o timeout=1800 " if guest else ""
    return (
        f"export CI=true HOME=/root PYTHONDONTWRITEBYTECODE=1; {pace}{py} -m sockwatch doctor; "
        f"{py} -m pytest -p no:cacheprovider -q --color=no -o addopts='' {limit}{' '.join(map(_sh, tests))}"
    )


def _sh(v: str) -> str:
    return "'" + v.replace("'", "'\\''") + "'"


def summary(run: Run) -> dict:
    """What the guest said: hooks doctor found loadable, and pytest's counts."""
    hooks_ok = len(re.findall(r"^\s*ok (?!compile|root|bpf|bcc|cgroup2|headers|btf|tracefs)", run.output, re.M))
    hooks_bad = re.findall(r"^\s*!! (.+?)\s{2,}", run.output, re.M)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", run.output)}
    return {"kernel": run.kernel, "booted": run.booted, "status": run.status, "seconds": round(run.seconds, 1),
            "hooks_loaded": hooks_ok, "hooks_refused": hooks_bad, "passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--kernel",
        action="append",
        choices=[*sorted(SERIES), "running"],
        help="6.1, 6.12, or running: this machine's own, without a VM (repeatable; default all three)",
    )
    ap.add_argument("--full", action="store_true", help="every kernel test but the benchmarks (~45 min a kernel)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per kernel (default 1800, --full 4200)")
    ap.add_argument("--json-out", default="", help="also write the table as JSON here")
    ap.add_argument("pytest_args", nargs="*", help="after --: what pytest runs in the guest (default: a subset)")
    args = ap.parse_args()
    # stopped (kill, a CI's timeout): unwind, so that _timed takes its QEMU down with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("kernels: run as root (scripts/kernels.sh asks for sudo)", file=sys.stderr)
        return 3
    if args.full and args.pytest_args:
        print("kernels: --full or tests after --, not both", file=sys.stderr)
        return 2
    timeout = args.timeout or (4200 if args.full else 1800)
    tests = args.pytest_args or (FULL_TESTS if args.full else DEFAULT_TESTS)
    rows = []
    for series in args.kernel or [*sorted(SERIES, key=lambda s: [int(x) for x in s.split(".")]), "running"]:
        if series == "running":
            log = CACHE / "running.log"
            say(f"running the same tests on this machine's kernel, {os.uname().release} (output: {log})")
            run = run_here(test_command(tests, guest=False), timeout, log)
        else:
            k = fetch(newest(series))
            log = CACHE / k.version / "console.log"
            say(f"booting {k.version} under QEMU, software emulation (console: {log})")
            run = boot(k, test_command(tests, guest=True), timeout, log)
        rows.append(summary(run))
    print(f"{'kernel':<31} {'booted':<7} {'hooks':>5} {'passed':>6} {'failed':>6} {'time':>7}  refused")
    for r in rows:
        print(f"{r['kernel']:<31} {'yes' if r['booted'] else 'NO':<7} {r['hooks_loaded']:>5} {r['passed']:>6} "
              f"{r['failed']:>6} {r['seconds']:>6.0f}s  {', '.join(r['hooks_refused']) or '-'}")  # fmt: skip
    if args.json_out:
        import json

        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["booted"] and r["status"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
