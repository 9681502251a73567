"""The Vagrantfile, offline: `vagrant validate --ignore-provider` (Debian's vagrant,
installed here only when this test runs), two boxes for both providers, and the same
install and test commands as the README's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAGRANTFILE = os.path.join(ROOT, "Vagrantfile")


def _vagrant() -> str:
    found = shutil.which("vagrant")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("vagrant is not installed and only root may install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "vagrant"], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    return shutil.which("vagrant") or "vagrant"


def test_vagrant_validates_the_vagrantfile(tmp_path) -> None:
    # nothing is written into the checkout or the home directory
    env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    r = subprocess.run([_vagrant(), "validate", "--ignore-provider"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(os.path.join(ROOT, ".vagrant"))


def test_two_distributions_for_both_providers() -> None:
    text = open(VAGRANTFILE).read()
    boxes = dict(re.findall(r'"(\w+)" => "([\w./-]+)"', text))
    assert boxes == {"debian12": "debian/bookworm64", "ubuntu2404": "bento/ubuntu-24.04"}
    assert "provider :libvirt" in text and "provider :virtualbox" in text


def test_the_vagrantfile_and_the_readme_give_the_same_commands() -> None:
    text = open(VAGRANTFILE).read()
    # the README's commands, and the VM's own in the testing docs it links
    readme = open(os.path.join(ROOT, "README.md")).read() + open(os.path.join(ROOT, "docs", "testing.md")).read()
    assert "scripts/install.sh" in text  # the provisioning is the install the README's commands run
    usage = re.findall(r"vagrant (?:up|ssh) \S+.*", text)
    assert usage, "the Vagrantfile says how to use it"
    for line in usage:
        assert line.strip() in readme, f"the README does not say: {line.strip()}"
    assert "scripts/test.sh" in readme and "cd /sockwatch && scripts/test.sh" in text
