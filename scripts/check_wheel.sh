#!/usr/bin/env bash
# CI: the wheel built from this checkout, installed into a fresh virtual environment outside the source tree,
# gives a working `geomoe`: --help, and `data check` on the sample it ships as package data.
set -euo pipefail
cd "$(dirname "$0")/.."
. "$(pwd)/scripts/uv_cmd.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
uv_cmd build --wheel --quiet -o "$work/dist"
# the locked versions (the same torch build as .venv, from uv's cache), then the wheel without its sources
uv_cmd export --locked --no-dev --no-emit-project --no-hashes --quiet -o "$work/requirements.txt"
uv_cmd venv --quiet --python "$(.venv/bin/python -c 'import sys; print(sys.executable)')" "$work/venv"
uv_cmd pip install --quiet --python "$work/venv/bin/python" -r "$work/requirements.txt" "$work"/dist/*.whl
cd "$work"  # away from the checkout: nothing may be imported from the source tree
sample="$("$work/venv/bin/python" -c 'from geomoe.pipelines.demo import SAMPLE; print(SAMPLE)')"
case "$sample" in "$work"/venv/*) ;; *) echo "check_wheel: the sample resolves to $sample, not into the installed package" >&2; exit 1 ;; esac
"$work/venv/bin/geomoe" --help >/dev/null
"$work/venv/bin/geomoe" data check "$sample/train"
echo "check_wheel: the installed wheel runs geomoe --help and data check on its packaged sample ($sample)"
