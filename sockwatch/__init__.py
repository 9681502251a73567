"""sockwatch: the kernel's socket demultiplexing table, live, from stable BPF hooks."""

import functools

__version__ = "0.1.0"  # the one place it is written (pyproject.toml reads it)


@functools.cache
def revision() -> str:
    """The git revision this runs from, where it runs from a checkout; '' when installed
    (read once a process)."""
    import os
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(here, ".git")):
        return ""
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                           timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def version_text() -> str:
    """`sockwatch 0.1.0`, with the git revision where this runs from a checkout."""
    rev = revision()
    return f"sockwatch {__version__}" + (f" (git {rev})" if rev else "")
