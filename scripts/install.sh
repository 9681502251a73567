#!/usr/bin/env bash
# Installs whatever sockwatch needs that this Debian machine lacks, then exits.
# Idempotent: each step checks first. As root (it asks for sudo otherwise). Used by
# scripts/run.sh and scripts/test.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${SOCKWATCH_VENV:-$here/.venv}
say() { printf 'install: %s\n' "$*" >&2; }

. "$here/scripts/as-root.sh"

# 1. Debian packages: bcc (python3-bpfcc; PyPI's "bcc" is another project), bpftool,
#    iproute2 (ss, ip netns), kernel headers for bcc to compile against, venv.
#    The distribution's headers for the running kernel where it has them (a stock Debian or
#    Ubuntu kernel), else Debian's current ones (linked in step 2); bpftool is its own
#    package on Debian, part of the kernel's tools on Ubuntu.
headers=linux-headers-$(uname -r)
apt-cache show "$headers" >/dev/null 2>&1 || headers=linux-headers-amd64
bpftool=bpftool
apt-cache show bpftool >/dev/null 2>&1 || bpftool=linux-tools-$(uname -r)
pkgs=(python3-bpfcc "$bpftool" iproute2 "$headers" python3-venv python3-pip procps)
# the tests also compile the shared header with gcc and drop privileges with setpriv
# drive `sockwatch live` in a real terminal (tmux), scrape the agent with a real Prometheus (and
# its promtool), make TLS certificates (openssl), and check the systemd unit (systemd-analyze)
# and boot other kernels (qemu-system-x86, busybox-static: scripts/kernels.sh, tests/kernel/test_vm.py)
[ "${SOCKWATCH_EXTRAS:-}" = dev ] && pkgs+=(gcc libc6-dev linux-libc-dev util-linux tmux prometheus openssl systemd
                                          qemu-system-x86 busybox-static)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. bcc looks for headers at /lib/modules/$(uname -r)/{build,source}.
"$here/scripts/link-headers.sh"

# 3. A virtual environment on Debian's python3 (the one python3-bpfcc is built for),
#    seeing its system packages for bcc, with sockwatch and its pinned dependencies.
extra=${SOCKWATCH_EXTRAS:-}
stamp="$venv/.sockwatch-installed$extra"
if [ ! -x "$venv/bin/python" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  [ -x "$venv/bin/python" ] || { say "creating $venv"; /usr/bin/python3 -m venv --system-site-packages "$venv"; }
  say "pip install -e .${extra:+[$extra]}"
  # compat: a .pth naming the checkout, not an import hook that every start-up loads (12 ms)
  "$venv/bin/pip" install -q --disable-pip-version-check --config-settings editable_mode=compat \
    -e "$here${extra:+[$extra]}"
  touch "$stamp"
fi
"$venv/bin/python" -c 'import bcc, typer, rich, textual, prometheus_client' \
  || { echo "install: the virtual environment cannot import bcc/typer/rich/textual/prometheus_client" >&2; exit 3; }
