#!/usr/bin/env bash
# One entry point for a fresh machine: installs uv if missing, syncs the locked environment, runs.
#   ./geomoe.sh demo        the demo on the shipped sample
#   ./geomoe.sh test        the test suite
#   ./geomoe.sh ARGS...     any geomoe command, e.g. ./geomoe.sh data check sample/train
set -euo pipefail
cd "$(dirname "$0")"

. "$(pwd)/scripts/uv_cmd.sh"
if ! uv_cmd --version >/dev/null 2>&1; then
  echo "geomoe: installing uv with pip" >&2
  python3 -m pip install -q --user uv 2>/dev/null \
    || python3 -m pip install -q --user --break-system-packages uv 2>/dev/null \
    || python3 -m pip install -q uv
fi
uv_cmd sync --locked --quiet

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec "$(pwd)/.venv/bin/python" -m pytest "$@" ;;
  demo) exec "$(pwd)/.venv/bin/geomoe" demo "$@" ;;
  *) exec "$(pwd)/.venv/bin/geomoe" "$cmd" "$@" ;;
esac
