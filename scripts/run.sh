#!/usr/bin/env bash
# Install what is missing, then run sockwatch (default: the socket table now).
#   sudo scripts/run.sh                 # sockwatch snapshot
#   sudo scripts/run.sh serve           # the agent
#   sudo scripts/run.sh snapshot --json --proto udp
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/install.sh"
[ $# -gt 0 ] || set -- snapshot
exec "${SOCKWATCH_VENV:-$here/.venv}/bin/sockwatch" "$@"
