"""The quick path of `sockwatch snapshot --json`: only its exact form is taken, and what
it asks the agent is what the CLI asks."""

from __future__ import annotations

import subprocess

import pytest

from sockwatch import quick
from sockwatch.filters import Filters
from tests.conftest import sockwatch_cmd


def test_it_asks_what_the_cli_asks():
    assert quick.NO_FILTERS == Filters().to_wire()


@pytest.mark.parametrize(
    "argv,want",
    [
        (["snapshot", "--json"], (True, None)),
        (["snapshot", "--json", "--socket", "/run/a.sock"], (True, "/run/a.sock")),
        (["snapshot", "--socket", "/run/a.sock", "--json"], (True, "/run/a.sock")),
        (["snapshot", "--json", "--socket=/run/a.sock"], (True, "/run/a.sock")),
        (["snapshot"], (False, None)),  # the table: the CLI renders it
        (["snapshot", "--json", "--json"], (False, None)),
        (["snapshot", "--json", "--socket"], (False, None)),  # the CLI says what is missing
        (["snapshot", "--json", "--socket", ""], (False, None)),
        (["snapshot", "--json", "--socket="], (False, None)),
        (["snapshot", "--json", "--socket", "--standalone"], (False, None)),
        (["snapshot", "--json", "--standalone"], (False, None)),
        (["snapshot", "--json", "--port", "53"], (False, None)),
        (["snapshot", "--json", "--help"], (False, None)),
        (["events", "--json"], (False, None)),
        ([], (False, None)),
    ],
)
def test_only_the_exact_form_is_taken(argv, want):
    assert quick.socket_of(argv) == want


def test_no_agent_at_a_given_socket_is_the_clis_sentence(tmp_path):
    r = subprocess.run(sockwatch_cmd("snapshot", "--json", "--socket", str(tmp_path / "none.sock")),
                       check=False, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 4 and r.stdout == ""
    assert r.stderr.startswith("sockwatch: ") and "Traceback" not in r.stderr and r.stderr.count("\n") <= 2
