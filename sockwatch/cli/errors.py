"""Every failure a user can cause or meet ends here: one sentence, what to do, exit code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from sockwatch.agent.client import AgentError
from sockwatch.filters import FilterError

EXIT_USAGE = 2
EXIT_ENV = 3  # the machine lacks something
EXIT_RUNTIME = 4


def fail(what: str, fix: str = "", code: int = EXIT_RUNTIME) -> typer.Exit:
    sys.stderr.write(f"sockwatch: {what}\n")
    if fix:
        sys.stderr.write(f"  to fix: {fix}\n")
    return typer.Exit(code)


@contextlib.contextmanager
def friendly() -> Iterator[None]:
    try:
        yield
    except FilterError as e:
        raise fail(str(e), "see --help for the filter syntax", EXIT_USAGE) from None
    except AgentError as e:
        raise fail(str(e)) from None
    except BrokenPipeError:
        # the reader went away (| head): not an error worth a traceback
        sys.stderr.close()
        raise typer.Exit(0) from None
    except PermissionError as e:
        raise fail(f"permission denied: {e.filename or e}", "run sockwatch as root (sudo)", EXIT_ENV) from None
    except Exception as e:
        # the kernel modules are imported only by the commands that read the kernel: one
        # not loaded raised nothing (and a command that only asks the agent, or --help,
        # starts without them)
        failure = _kernel_failure(e)
        if failure is None:
            raise
        raise failure from None


def _kernel_failure(e: Exception) -> typer.Exit | None:
    """The one sentence for an error of the kernel's modules, or None: not theirs."""
    prereq = sys.modules.get("sockwatch.kernel.prereq")
    if prereq is not None and isinstance(e, prereq.PrereqError):
        return fail(e.what, e.fix, EXIT_ENV)
    abi = sys.modules.get("sockwatch.kernel.abi")
    if abi is not None and isinstance(e, abi.AbiMismatch):
        return fail(str(e), code=EXIT_ENV)
    sockdiag = sys.modules.get("sockwatch.kernel.sockdiag")
    if sockdiag is not None and isinstance(e, sockdiag.SockDiagError):
        return fail(e.strerror or str(e), "load the kernel's socket diagnostics (modprobe tcp_diag udp_diag)",
                    EXIT_ENV)  # fmt: skip
    bpfload = sys.modules.get("sockwatch.kernel.bpfload")
    if bpfload is not None and isinstance(e, bpfload.LoadError):
        return fail(e.what, e.fix, EXIT_ENV)
    return None
