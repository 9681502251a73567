"""Shared test plumbing. Kernel tests need root and BPF: they fail (never skip) when
CI=true, so a green CI always means the BPF code ran."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

# no per-example deadline: CI machines and benchmarks running beside the suite make timing
# noise, and what these properties check is correctness, not speed
settings.register_profile("sockwatch", deadline=None)
settings.load_profile("sockwatch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# How much slower than this machine the tests run: the kernel runner's QEMU guests set 10
# (software emulation). Waits for the agent to work off a load scale with it; bounds that
# tell a stall from slowness do not, where the stall they rule out is longer still.
PACE = float(os.environ.get("SOCKWATCH_TEST_PACE") or 1)


def sockwatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sockwatch", *args]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/kernel/" in str(item.fspath) or "/bench/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
