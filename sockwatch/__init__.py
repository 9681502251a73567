"""sockwatch: the kernel's socket demultiplexing table, live, from stable BPF hooks."""

__version__ = "0.1.0"  # the one place it is written (pyproject.toml reads it)


def version_text() -> str:
    """`sockwatch 0.1.0`, with the git revision where this runs from a checkout."""
    import os
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = ""
    if os.path.isdir(os.path.join(here, ".git")):
        try:
            r = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                               timeout=5, check=False)  # fmt: skip
            rev = r.stdout.strip() if r.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            rev = ""
    return f"sockwatch {__version__}" + (f" (git {rev})" if rev else "")
