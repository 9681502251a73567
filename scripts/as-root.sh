# Sourced by the entry scripts: run the rest of the calling script as root. Root (a
# container, CI) goes on as it is; another user is asked for sudo, with the settings the
# scripts read kept; without root or sudo, one sentence and exit 3.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=CI,SOCKWATCH_VENV,SOCKWATCH_EXTRAS,SOCKWATCH_SOCKET -- "$0" "$@"
  fi
  echo "$(basename "$0"): run as root: it installs Debian packages and loads BPF programs (no sudo here)" >&2
  exit 3
fi
