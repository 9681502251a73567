#!/usr/bin/env bash
# Install what is missing, then run the snapshot benchmark (100,000 sockets by default;
# a few minutes). Arguments go to bench/bench_snapshot.py (e.g. --sockets 200000).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/install.sh"
exec "${SOCKWATCH_VENV:-$here/.venv}/bin/python" "$here/bench/bench_snapshot.py" "$@"
