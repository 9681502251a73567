"""The capabilities deploy/ grants (the systemd unit's bounding set, the DaemonSet's
list: the same) are enough for every hook, the sk_lookup hook in every namespace and
its drop-site check, and the table they give equals ss."""

from __future__ import annotations

from tests.kernel.conftest import AgentProc, compare_with_ss
from tests.unit.test_deploy import unit_capabilities

CAP_NUMBERS = {
    "DAC_READ_SEARCH": 2,
    "NET_ADMIN": 12,
    "SYS_PTRACE": 19,
    "SYS_ADMIN": 21,
    "SYS_RESOURCE": 24,
    "PERFMON": 38,
    "BPF": 39,
    "SYSLOG": 34,
}  # linux/capability.h


def bounding_set(pid: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("CapBnd:")).split()[1], 16)


def test_the_deployed_capabilities_attach_every_hook(tmp_path, netns, child_factory):
    caps = ",".join("+" + c.lower() for c in unit_capabilities())
    prefix = ("setpriv", "--no-new-privs", f"--bounding-set=-all,{caps}", "--inh-caps=-all")
    a = AgentProc(socket=str(tmp_path / "a.sock"), prefix=prefix)
    try:
        st = a.status()
        want = sum(1 << CAP_NUMBERS[c] for c in unit_capabilities()) & bounding_set("self")
        assert bounding_set(str(a.proc.pid)) == want  # it really ran with only those (that we have)
        assert not st.get("hooks_missing"), st.get("hooks_missing")
        assert st["lookup"]["namespaces_hooked"] == st["namespaces"] and st["lookup"]["namespaces_refused"] == 0
        assert st["lookup"]["drop_sites_checked"], "kernel addresses hidden: CAP_SYSLOG is missing"
        c = child_factory(netns.name)
        c.do(op="tcp_listen", addr="0.0.0.0", port=47320)
        c.do(op="udp_bind", addr="127.0.0.1", port=47321)
        c.do(op="tcp_connect", addr="127.0.0.1", port=47320, accept_on=1)
        compare_with_ss(netns, a.socket, expect_pid=c.pid)
    finally:
        a.stop()
