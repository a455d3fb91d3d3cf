#!/usr/bin/env bash
# Packs the GPU quality bench for two calls (no network there, 64 MiB a call, Python 3.12): .gpu = the wheels
# (pack.sh) and part A of ../shared/data, .gpu2 = part B (scripts/device/data_parts.py). Then, on one warm machine:
# run carry [".gpu"] `bash scripts/device/setup.sh` (docs/ and sample/ moved out of the checkout for that call),
# and at once run carry [".gpu2"] `bash scripts/device/quality.sh` (QUALITY_S, CALL_S, SPEED_S as it says).
set -euo pipefail
cd "$(dirname "$0")/../.."
for d in /.gpu/ /.gpu2/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
[ -f .gpu/site312.tar.xz ] || bash scripts/device/pack.sh
rm -rf .gpu/data .gpu2 && mkdir -p .gpu2/data
(cd scripts/device && ../../.venv/bin/python data_parts.py ../../.gpu/data ../../.gpu2/data)
xz -9 .gpu/data/*/labels.geojson
du -sh .gpu .gpu2
