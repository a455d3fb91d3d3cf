#!/usr/bin/env bash
# Second call for the GPU quality bench (after setup.sh, on the same warm machine): part B of the data (.gpu2), then
# bench/quality.py (CONFIG, QUALITY_S), then the speed bench on its bundle if SPEED_S seconds are still left of
# CALL_S. Outputs under $OUT.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
cp -r .gpu2/data/. /tmp/gpudata/ || exit 1
export PYTHONPATH=/tmp/site
python3 -c 'import pydantic, rasterio' || exit 1
mkdir -p docs  # the picture goes there (docs/ stays behind when the wheels travel)
python3 -m pip install -q --no-deps --no-build-isolation . > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 1; }
mkdir -p ../shared && ln -sfn /tmp/gpudata ../shared/data
echo "setup $(( $(date +%s) - t0 )) s"
cfg=${CONFIG:-bench/configs/gpu_short.yaml}
timeout ${QUALITY_S:-500} python3 bench/quality.py --config $cfg --parts main --out /tmp/q --results quality_gpu \
  > $OUT/quality.log 2>&1
echo "quality rc $? at $(( $(date +%s) - t0 )) s"
grep -a -v "it/s\]\|s/it\]\|batch/s\]\|s/batch\]" $OUT/quality.log | tail -40
cp bench/results/quality_gpu.json docs/quality_gpu_dense_test_area.png /tmp/q/times.json $OUT/ 2>/dev/null
git diff bench/RESULTS.md > $OUT/RESULTS.diff
left=$(( ${CALL_S:-590} - ($(date +%s) - t0) ))
echo "left $left s"
if [ -f /tmp/q/bundle/manifest.json ] && [ $left -gt ${SPEED_S:-150} ]; then
  python3 scripts/device/mosaic.py /tmp/gpudata
  cd bench && timeout $(( left - 15 )) python3 speed.py --bundle /tmp/q/bundle --config ../$cfg --repeat 2 \
    --results speed_gpu 2>&1 | grep -a -v "it/s\]" | tee $OUT/speed.log
  cp results/speed_gpu.json $OUT/ 2>/dev/null; git diff RESULTS.md > $OUT/RESULTS.diff; cd ..
fi
echo "all done at $(( $(date +%s) - t0 )) s"
