"""The agent's log lines as exporters write them (--log-format, --log-level)."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess

import pytest

from sockwatch import logs
from tests.conftest import sockwatch_cmd


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_logfmt_json_and_text_lines_at_the_level_asked():
    out = io.StringIO()
    logs.setup("info", "logfmt", out)
    logging.getLogger("sockwatch.test").debug("not shown")
    logging.getLogger("sockwatch.test").warning('a "quoted"\nline')
    line = out.getvalue()
    assert re.fullmatch(r'ts=\d{4}-\d\d-\d\dT[\d:.]+\+00:00 level=warn msg="a \\"quoted\\"\\nline"\n', line), line
    out = io.StringIO()
    logs.setup("debug", "json", out)
    logging.getLogger("sockwatch.test").debug("attached; %d sockets", 3)
    got = json.loads(out.getvalue())
    assert got["level"] == "debug" and got["msg"] == "attached; 3 sockets" and got["ts"].endswith("+00:00")
    out = io.StringIO()
    logs.setup("error", "text", out)
    logging.getLogger("sockwatch.test").warning("not shown")
    logging.getLogger("sockwatch.test").error("gone")
    assert out.getvalue() == "sockwatch: gone\n"


@pytest.mark.parametrize(("args", "said"), [
    (["--log-level", "loud"], "--log-level must be one of debug, info, warn, error, not 'loud'"),
    (["--log.format", "xml"], "--log-format must be one of text, logfmt, json, not 'xml'"),
])  # fmt: skip
def test_bad_log_flags_are_one_sentence(args, said):
    r = subprocess.run(sockwatch_cmd("serve", *args), capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.startswith(f"sockwatch: {said}"), r.stderr
