#!/usr/bin/env bash
# bcc compiles against /lib/modules/$(uname -r)/{build,source}. A kernel without its own
# headers package gets Debian's newest ones (linux-headers-amd64): sockwatch reads only
# UAPI structs, so a version mismatch cannot shift any offset it uses. Run by install.sh
# and, in the container, at each start (the node's kernel is known only then).
set -euo pipefail
say() { printf 'install: %s\n' "$*" >&2; }
kver=$(uname -r)
mod=${SOCKWATCH_MODULES_DIR:-/lib/modules}/$kver
if [ -e "$mod/build/include" ] || [ -e /sys/kernel/kheaders.tar.xz ]; then
  exit 0
fi
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
com=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
if [ -z "$hdr" ] || [ -z "$com" ]; then
  echo "install: no linux-headers-*-amd64 under /usr/src after installing linux-headers-amd64" >&2
  exit 3
fi
mkdir -p "$mod"
ln -sfn "$hdr" "$mod/build"
ln -sfn "$com" "$mod/source"
say "linked $mod/build -> $hdr"
