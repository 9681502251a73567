#!/usr/bin/env bash
# Install what is missing, then run sockwatch (default: the socket table now).
#   scripts/run.sh                 # sockwatch snapshot
#   scripts/run.sh serve           # the agent
#   scripts/run.sh snapshot --json --proto udp
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/as-root.sh"
"$here/scripts/install.sh"
[ $# -gt 0 ] || set -- snapshot
exec "${SOCKWATCH_VENV:-$here/.venv}/bin/sockwatch" "$@"
