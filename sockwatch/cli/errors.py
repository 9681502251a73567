"""Every failure a user can cause or meet ends here: one sentence, what to do, exit code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from sockwatch.agent.client import AgentError
from sockwatch.filters import FilterError
from sockwatch.kernel.abi import AbiMismatch
from sockwatch.kernel.prereq import PrereqError
from sockwatch.kernel.sockdiag import SockDiagError

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
    except PrereqError as e:
        raise fail(e.what, e.fix, EXIT_ENV) from None
    except AbiMismatch as e:
        raise fail(str(e), code=EXIT_ENV) from None
    except SockDiagError as e:
        raise fail(e.strerror or str(e), "load the kernel's socket diagnostics (modprobe tcp_diag udp_diag)",
                   EXIT_ENV) from None  # fmt: skip
    except AgentError as e:
        raise fail(str(e)) from None
    except BrokenPipeError:
        # the reader went away (| head): not an error worth a traceback
        sys.stderr.close()
        raise typer.Exit(0) from None
    except PermissionError as e:
        raise fail(f"permission denied: {e.filename or e}", "run sockwatch as root (sudo)", EXIT_ENV) from None
    except Exception as e:
        # the loader is imported only by the commands that load BPF: if it is not loaded,
        # nothing raised its LoadError (and a command that only asks the agent starts faster)
        bpfload = sys.modules.get("sockwatch.kernel.bpfload")
        if bpfload is not None and isinstance(e, bpfload.LoadError):
            raise fail(e.what, e.fix, EXIT_ENV) from None
        raise
