#!/usr/bin/env bash
# Install what is missing (with the dev tools), then lint, type-check and run the whole
# suite: unit tests (no root) and kernel tests (real sockets, real BPF, ss as the oracle).
# Extra arguments go to pytest (e.g. -k udp, -m slow).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/as-root.sh"
SOCKWATCH_EXTRAS=dev "$here/scripts/install.sh"
py="${SOCKWATCH_VENV:-$here/.venv}/bin"
cd "$here"
echo "== ruff"; "$py/ruff" check sockwatch tests bench
echo "== mypy"; "$py/mypy" sockwatch
echo "== pytest"; exec "$py/pytest" "$@"
