#!/usr/bin/env bash
# Install what is missing (QEMU and busybox too), then boot other kernels under QEMU with
# this machine's filesystem and run sockwatch's kernel tests inside each:
#   scripts/kernels.sh                                  # 6.1, 6.12 and the running kernel (~12 minutes)
#   scripts/kernels.sh --kernel 6.1 -- tests/kernel/test_table.py -k reuseport
# Kernels and headers come from apt into /var/cache/sockwatch-kernels.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/as-root.sh"
SOCKWATCH_EXTRAS=dev "$here/scripts/install.sh"
cd "$here"
exec "${SOCKWATCH_VENV:-$here/.venv}/bin/python" tests/vm/kernels.py "$@"
