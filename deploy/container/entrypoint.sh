#!/bin/sh
# Link kernel headers for the node's kernel (into /lib/modules, an emptyDir), then run sockwatch.
set -eu
/opt/sockwatch/scripts/link-headers.sh
exec /opt/sockwatch/.venv/bin/sockwatch "$@"
