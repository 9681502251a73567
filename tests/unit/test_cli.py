"""The CLI as a person meets it: clear sentences and exit codes, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT, sockwatch_cmd

NOBODY = "65534"


def run(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), *sockwatch_cmd(*args)], check=False, capture_output=True, text=True, timeout=120
    )


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


@pytest.fixture
def nobody_run() -> Iterator:
    """Run sockwatch as an unprivileged user. A checkout under a private directory (here
    /tmp is 0700) is bind-mounted where that user can reach it, and unmounted after."""
    if os.geteuid() != 0:
        yield run
        return
    reachable = subprocess.run(as_nobody(sys.executable, "-c", "import sockwatch"), check=False).returncode == 0
    if reachable:
        yield lambda *args: run(*args, prefix=as_nobody())
        return
    if not sys.prefix.startswith(ROOT + os.sep):
        pytest.fail(f"the venv {sys.prefix} is outside the checkout and not reachable by uid {NOBODY}")
    top = tempfile.mkdtemp(dir="/var/tmp", prefix="sockwatch-nobody-")
    os.chmod(top, 0o755)
    mnt = os.path.join(top, "src")
    os.mkdir(mnt)
    subprocess.run(["mount", "--bind", ROOT, mnt], check=True)
    try:
        python = os.path.join(mnt, os.path.relpath(sys.executable, ROOT))

        def go(*args: str) -> subprocess.CompletedProcess:
            env = {**os.environ, "PYTHONPATH": mnt}
            cmd = as_nobody("env", f"PYTHONPATH={mnt}", python, "-m", "sockwatch", *args)
            return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env, cwd="/")

        yield go
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)
        os.rmdir(top)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["snapshot", "--port", "70000"], "port '70000' is out of range"),
        (["snapshot", "--addr", "10.0.0.0/40"], "is not an IP address or CIDR"),
        (["snapshot", "--state", "sleepy"], "state 'sleepy' is not one of"),
        (["snapshot", "--proto", "icmp"], "not tcp or udp"),
        (["serve", "--ringbuf-pages", "1000"], "not a power of two"),
    ],
)
def test_bad_input_is_one_clear_sentence(args, needle):
    r = run(*args)
    assert r.returncode == 2, r
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["snapshot", "--standalone"], ["serve", "--socket", "/var/tmp/sw-nonroot/a.sock"]])
def test_not_root_says_so(args, nobody_run):
    assert shutil.which("setpriv"), "setpriv (util-linux) is installed by scripts/install.sh"
    r = nobody_run(*args)
    assert r.returncode == 3, r
    assert not os.path.exists("/var/tmp/sw-nonroot"), "a refused start must create nothing"
    assert "root" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_filters():
    r = run("snapshot", "--help")
    assert r.returncode == 0
    for opt in ("--proto", "--port", "--addr", "--state", "--pid", "--netns", "--json"):
        assert opt in r.stdout


def test_status_without_agent(tmp_path):
    r = run("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode != 0 and "there is no agent socket at" in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", "--socket", ""], "the socket path is empty"),
        (["serve", "--socket", "rel.sock"], "is relative"),
        (["serve", "--socket", "/run/"], "names a directory"),
        (["serve", "--socket", "/proc/1/x.sock"], "is under /proc"),
        (["serve", "--socket", "/" + "a" * 200], "at most 107"),
        (["serve", "--reconcile-interval", "inf"], "is not a number of seconds (1 to 86400)"),
        (["serve", "--reconcile-interval", "nan"], "is not a number of seconds"),
        (["serve", "--reconcile-interval", "0.5"], "out of range: 1 to 86400"),
        (["serve", "--ringbuf-pages", str(2**40)], "out of range: 16 to 65536"),
        (["serve", "--stream-cpu", "0"], "out of range: 1 to 100"),
        (["serve", "--stream-cpu", "50.5"], "is not a whole number (1 to 100)"),
        (["serve", "--max-udp", "2_000"], "is not a whole number (1024 to 16777216)"),
        (["serve", "--max-udp", "9" * 5000], "is not a whole number"),
        (["snapshot", "--port", "1_000"], "is not a number"),
        (["snapshot", "--pid", str(2**64)], "out of range"),
        (["snapshot", "--netns", "\u0661\u0662"], "is not a namespace name, pid or inode"),
        (["snapshot", "--netns", "../../etc"], "is not a namespace name, pid or inode"),
        (["snapshot", "--netns", "no-such-ns-here"], "no such namespace in ip netns list"),
        (["snapshot", "--netns", str(2**64)], "out of range"),
        (["snapshot", "--netns", "4194303"], "no process 4194303"),
        (["events", "--kind", "binds"], "is not one of: bind, bind_fail"),
        (["ports", "--top", "0"], "out of range: 1 to 100000"),
        (["explain", "icmp", "10.0.0.1:80"], "protocol 'icmp' is not tcp or udp"),
        (["explain", "tcp", "10.0.0.1"], "is not ADDR:PORT"),
        (["explain", "tcp", "10.0.0.1:0"], "destination port '0' is out of range: 1 to 65535"),
        (["explain", "udp", "dns:53"], "'dns' is not an IP address"),
        (["explain", "tcp", "10.0.0.1:80", "--from", "[::1]:99999"], "--from port '99999' is out of range"),
        # IPv6 without brackets is ambiguous (an address alone, or address and port)
        (["explain", "tcp", "::1:80"], "write an IPv6 address in brackets, [ADDR]:PORT"),
        (["explain", "tcp", "fe80::1:80"], "write an IPv6 address in brackets, [ADDR]:PORT"),
        # a scope names a device, which the table does not show: refused, not ignored
        (["explain", "tcp", "[fe80::1%lo]:9103"], "a scoped address (%lo) is not supported"),
        (["explain", "tcp", "10.0.0.1:80", "--from", "[fe80::2%vA0]:5"], "a scoped address (%vA0) is not supported"),
        (["explain", "bind", "sctp", "10.0.0.1:80"], "protocol 'sctp' is not tcp or udp"),
        (["explain", "bind", "tcp", "10.0.0.1:99999"], "address port '99999' is out of range: 0 to 65535"),
        (["explain", "bind", "udp", "10.0.0.1:53", "--uid", "-1"], "--uid"),
        (["explain", "bind", "udp", "10.0.0.1:53", "--v6only"], "--v6only is an IPv6 socket's option"),
        (["explain", "bind", "tcp", "[::1]:80", "--netns", "../x"], "is not a namespace name, pid or inode"),
        (["snapshot", "--drops", "--peers"], "--peers and --drops are two views: ask for one"),
        (["snapshot", "--standalone", "--addr", "fe80::1%vA0"], "a scoped address (%DEVICE) is not supported"),
        (["snapshot", "--standalone", "--addr", "fe80::1%nonexistent"], "a scoped address (%DEVICE) is not supported"),
    ],
)
def test_options_are_strict_and_name_their_bounds(args, needle):
    r = run(*args)
    assert r.returncode == 2 and needle in r.stderr, r
    assert "Traceback" not in r.stderr and len(r.stderr) < 400  # never echoes a 5,000-digit input


@given(st.text(max_size=60))
def test_any_number_text_parses_within_bounds_or_says_why(text):
    from sockwatch.cli import args

    try:
        n = args.integer(text, "--max-udp", 1024, 16_777_216)
        assert 1024 <= n <= 16_777_216 and text.strip().isascii() and text.strip().isdigit()
    except args.ArgError as e:
        assert str(e).startswith("--max-udp ") and len(str(e)) < 200
    try:
        x = args.seconds(text, "--reconcile-interval", 1, 86400)
        assert 1 <= x <= 86400
    except args.ArgError as e:
        assert "--reconcile-interval" in str(e) and len(str(e)) < 200


@given(st.text(max_size=300) | st.just("/\ud800.sock"))
def test_any_socket_path_is_accepted_only_when_safe(text):
    from sockwatch.agent import sockpath

    try:
        p = sockpath.validate(text)
    except sockpath.PathError as e:
        assert len(str(e)) < 300
        return
    assert p.startswith("/") and len(os.fsencode(p)) <= 107 and "\0" not in p
    assert not any(p == r or p.startswith(r + "/") for r in ("/proc", "/sys", "/dev"))


@pytest.mark.parametrize("command", ["live", "snapshot", "events", "ports", "explain", "serve", "status", "doctor"])
def test_every_command_explains_itself_at_80_columns(command):
    r = subprocess.run(sockwatch_cmd(command, "--help"), capture_output=True, text=True, check=False,
                       env={**os.environ, "COLUMNS": "80", "TERM": "dumb"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "Example" in r.stdout and "Usage:" in r.stdout
    text = [line.strip() for line in lines if line.strip() and not line.startswith(("╭", "│", "╰"))]
    assert len(text) >= 4  # a description, not just a usage line
    top = subprocess.run(sockwatch_cmd("--help"), capture_output=True, text=True, check=False,
                         env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    listed = next(line for line in top.stdout.splitlines() if line.startswith(f"│ {command} "))
    assert len(listed.split()) > 3, listed  # a one-line summary in the command list


def test_shell_completion_completes_commands_and_options():
    exe = os.path.join(os.path.dirname(sys.executable), "sockwatch")  # the installed command, as a shell sees it
    # typer names the shell it runs under (a bash that stays the parent: "; true"), not an argument
    r = subprocess.run(["bash", "-c", f"{shlex.quote(exe)} --show-completion; true"], capture_output=True, text=True,
                       check=False)  # fmt: skip
    assert r.returncode == 0 and "_SOCKWATCH_COMPLETE=complete_bash" in r.stdout, r
    env = {**os.environ, "_SOCKWATCH_COMPLETE": "complete_bash", "COMP_WORDS": "sockwatch sn", "COMP_CWORD": "1"}
    r = subprocess.run([exe], capture_output=True, text=True, check=False, env=env)
    assert r.stdout.split() == ["snapshot"], r
    env |= {"COMP_WORDS": "sockwatch events --ki", "COMP_CWORD": "2"}
    r = subprocess.run([exe], capture_output=True, text=True, check=False, env=env)
    assert "--kind" in r.stdout.split(), r


def test_an_interrupt_inside_an_import_is_still_just_an_interrupt():
    """Ctrl-C landing inside a class's creation comes out of Python 3.11 as a
    RuntimeError caused by KeyboardInterrupt: no traceback, exit 130."""
    code = (
        "import sys\nfrom sockwatch import cli, entry\n"
        "def boom():\n"
        "    try:\n        raise KeyboardInterrupt\n"
        "    except KeyboardInterrupt as e:\n        raise RuntimeError('Error calling __set_name__') from e\n"
        "cli.app.command('boom')(boom)\nsys.argv = ['sockwatch', 'boom']\nentry.run()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("how", ["plain", "wrapped"])
def test_ctrl_c_while_the_cli_is_imported_is_an_interrupt(how, monkeypatch, capsys):
    import builtins

    from sockwatch import entry

    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "sockwatch.cli":
            if how == "plain":
                raise KeyboardInterrupt
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise RuntimeError("Error calling __set_name__") from e
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as ex:
        entry.run()
    assert ex.value.code == 130 and "Aborted!" in capsys.readouterr().err


def test_another_error_while_the_cli_is_imported_is_not_hidden(monkeypatch):
    import builtins

    from sockwatch import entry

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "sockwatch.cli":
            raise RuntimeError("a real bug")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(RuntimeError, match="a real bug"):
        entry.run()


def test_version_and_short_help():
    from sockwatch import __version__

    v = subprocess.run(sockwatch_cmd("--version"), capture_output=True, text=True, check=False)
    want = rf"sockwatch {re.escape(__version__)}( \(git [0-9a-f]{{12}}\))?\n"
    assert v.returncode == 0 and re.fullmatch(want, v.stdout), v.stdout
    assert subprocess.run(sockwatch_cmd("-V"), capture_output=True, text=True, check=False).stdout == v.stdout
    for args in (("-h",), ("snapshot", "-h"), ("serve", "-h")):
        h = subprocess.run(sockwatch_cmd(*args), capture_output=True, text=True, check=False)
        assert h.returncode == 0 and "Usage:" in h.stdout, (args, h.stderr)


@pytest.mark.parametrize("command", ["snapshot", "live", "events", "ports", "explain", "serve", "status", "doctor"])
def test_every_option_says_what_its_value_is(command):
    """Placeholders name the value (PORT, SECONDS, ADDR:PORT), not a Python type."""
    r = subprocess.run(sockwatch_cmd(command, "--help"), capture_output=True, text=True, check=False,
                       env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    typed = [line for line in r.stdout.splitlines()
             if re.match(r"│\s+-", line) and re.search(r"<(str|int|float|bool|list)", line)]  # fmt: skip
    assert not typed, typed


def test_nothing_matched_is_said_on_stderr_and_stdout_stays_clean():
    for extra, out in (([], ""), (["--json"], "[]")):
        r = subprocess.run(sockwatch_cmd("snapshot", "--standalone", "--proto", "udp", "--port", "1", *extra),
                           capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
        assert (r.returncode, r.stderr) == (0, "sockwatch: no socket matched the filters\n")
        assert (json.loads(r.stdout)["sockets"] if extra else r.stdout) == ([] if extra else out)


@pytest.mark.parametrize("words, want", [
    ("sockwatch snapshot --state TI", ["TIME-WAIT"]),
    ("sockwatch snapshot --state l", ["listen", "last-ack"]),
    ("sockwatch events --kind bi", ["bind", "bind_fail"]),
    ("sockwatch live --view co", ["connections"]),
    ("sockwatch ports --proto u", ["udp"]),
])  # fmt: skip
def test_shell_completion_offers_the_values_of_a_choice(words, want):
    """What `sockwatch --install-completion` installs asks the program itself: the values
    of --state, --kind, --view and --proto complete."""
    env = {**os.environ, "_SOCKWATCH_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}  # fmt: skip
    installed = os.path.join(os.path.dirname(sys.executable), "sockwatch")  # the command as installed: its name
    r = subprocess.run([installed], capture_output=True, text=True, check=False, timeout=60, env=env)
    assert r.stdout.split() == want, r


HELPS = [["--help"], ["-h"], [], *([c, "--help"] for c in ("live", "snapshot", "events", "ports", "explain", "serve",
                                                             "status", "doctor")), ["serve", "-h"]]  # fmt: skip


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
@pytest.mark.parametrize("columns", ["80", "200"])
def test_the_quick_help_is_the_full_apps_byte_for_byte(args, columns):
    """`sockwatch --help` lists the commands from an app without their options, and
    `sockwatch CMD --help` builds that command alone (typer builds them all otherwise):
    the same text, the same exit code."""
    env = {**os.environ, "COLUMNS": columns}
    installed = os.path.join(os.path.dirname(sys.executable), "sockwatch")  # (its usage line names it so)
    quick = subprocess.run([installed, *args], capture_output=True, text=True, check=False, timeout=60, env=env)
    whole = (f"import sys, rich.markdown, rich.traceback; from sockwatch.cli import app; "  # (none deferred: lazyrich)
             f"sys.argv[:] = ['sockwatch', *{args!r}]; app()")  # fmt: skip
    full = subprocess.run([sys.executable, "-c", whole], capture_output=True, text=True, check=False, timeout=60,
                          env=env)  # fmt: skip
    assert (quick.returncode, quick.stdout, quick.stderr) == (full.returncode, full.stdout, full.stderr)
    shown = f"Usage: sockwatch {args[0]} [OPTIONS]" if args and not args[0].startswith("-") else "snapshot"
    assert shown in quick.stdout + quick.stderr  # (the help it is: a command's own, or the list)


def test_the_command_list_imports_no_markdown_parser():
    """typer.rich_utils' markdown and traceback imports wait for their first use (lazyrich):
    the list is not markdown, and a command's help in markdown still renders as markdown."""
    code = ("import sys; sys.argv[:] = ['sockwatch', *sys.argv[1:]]\n"
            "from sockwatch.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = ('markdown_it', 'rich.traceback')\n"
            "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)")  # fmt: skip
    listed = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=False,
                            timeout=60)  # fmt: skip
    assert listed.stderr.strip() == "[]", listed.stderr
    one = subprocess.run([sys.executable, "-c", code, "snapshot", "--help"], capture_output=True, text=True,
                         check=False, timeout=60)  # fmt: skip
    assert one.stderr.strip() == "['markdown_it']", one.stderr
