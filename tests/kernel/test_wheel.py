"""The project as a user installs it: a wheel built from the checkout, installed into a
fresh virtual environment beside Debian's bcc (as `pipx install --system-site-packages`
does), runs the agent from its own files (the BPF sources ride in the wheel) and answers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

from sockwatch import __version__
from tests.conftest import ROOT


def test_a_built_wheel_installs_and_runs_the_agent(tmp_path):
    wheels, venv, work, src = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere", tmp_path / "src"
    work.mkdir()
    # built from a copy: a build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             ".hypothesis", "*_cache", "results"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (whl,) = wheels.glob("sockwatch-*.whl")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(whl)], check=True, capture_output=True, timeout=600)
    sw = str(venv / "bin" / "sockwatch")
    # run from elsewhere: nothing of the checkout is on the path
    v = subprocess.run([sw, "--version"], cwd=work, capture_output=True, text=True, check=True)
    assert v.stdout == f"sockwatch {__version__}\n"
    show = "import sockwatch.kernel.bpfload as b; print(b.BPF_DIR)"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", show], cwd=work, capture_output=True, text=True,
                           check=True).stdout.strip()  # fmt: skip
    assert where == str(venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" /
                        "sockwatch" / "bpf")  # fmt: skip
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen([sw, "serve", "--socket", sock, "--listen", "off"], cwd=work, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            st = subprocess.run([sw, "status", "--json", "--socket", sock], cwd=work, capture_output=True, text=True,
                                check=False)  # fmt: skip
            if st.returncode == 0:
                break
            assert agent.poll() is None, agent.stderr.read().decode() if agent.stderr else ""
            assert time.monotonic() < deadline, st.stderr
            time.sleep(0.2)
        status = json.loads(st.stdout)
        assert status["version"] == __version__ and not status["hooks_missing"], status
        snap = subprocess.run([sw, "snapshot", "--json", "--socket", sock], cwd=work, capture_output=True, text=True,
                              check=True)  # fmt: skip
        assert isinstance(json.loads(snap.stdout)["sockets"], list)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0
