#!/usr/bin/env bash
# Install what is missing (gcc too, for the load generators), then run a benchmark:
#   scripts/bench.sh cost       # paired: the host's cost with vs without the agent, C loops (~5 minutes)
#   scripts/bench.sh snapshot   # snapshot speed at 100,000 sockets vs ss (~2 minutes)
#   scripts/bench.sh churn      # churn with idle clients and snapshots; table vs ss after (~80 s)
#   scripts/bench.sh live       # live and events at 100,000 sockets under churn (~5 minutes)
#   scripts/bench.sh scrape     # a Prometheus scrape at 100,000 sockets vs an empty table (~4 minutes)
#   scripts/bench.sh lookup     # paired triples: the sk_lookup hook vs its floor, two UDP floods, TCP crr (~4 minutes)
#   scripts/bench.sh traffic    # paired triples: nginx (new connection per request, keep-alive) and the C
#                               # loop closing by FIN and RST, sockwatch vs the bare-sockops floor (~35 minutes)
#   scripts/bench.sh peers      # host CPU per connection: sockwatch vs bcc's tcplife and tcpstates (~5 minutes)
#   scripts/bench.sh dns        # paired: unbound under dnsperf, the sk_lookup hook vs its floor (~5 minutes)
# Further arguments go to the benchmark (e.g. cost --pairs 31 --churn-seconds 600).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/as-root.sh"
SOCKWATCH_EXTRAS=dev "$here/scripts/install.sh"
which=${1:-cost}
[ $# -gt 0 ] && shift
case "$which" in
  cost|snapshot|churn|live|scrape|lookup) ;;
  traffic|peers|dns)  # real servers from Debian as the workloads (and the peers' tools)
    missing=()
    for p in nginx-light wrk bpfcc-tools unbound dnsperf; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      echo "bench: apt-get install ${missing[*]}" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi ;;
  *) echo "bench: say cost, snapshot, churn, live, scrape, lookup, traffic, peers or dns" >&2; exit 2 ;;
esac
exec "${SOCKWATCH_VENV:-$here/.venv}/bin/python" "$here/bench/bench_$which.py" "$@"
