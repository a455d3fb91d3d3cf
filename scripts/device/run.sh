#!/usr/bin/env bash
# On the lent GPU machine (made by scripts/device/pack.sh): unpack the carried packages and data, train the speed
# bundle, run the speed bench, then profile the footprint stage alone on a perfect model.
set -x
export PYTHONUNBUFFERED=1
t0=$(date +%s)
mkdir -p /tmp/site && tar xJf .gpu/site312.tar.xz -C /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation . > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 1; }
mkdir -p ../shared && ln -sfn "$PWD/.gpu/data" ../shared/data
python3 .gpu/mosaic.py || exit 1
python3 -c "import rasterio, pyogrio, faiss, geopandas, segmentation_models_pytorch, umap, torch, lightning, skimage, numpy; print(torch.__version__, lightning.__version__, numpy.__version__, skimage.__version__, torch.cuda.get_device_name())" || exit 1
nproc; free -g | head -2
echo "setup $(( $(date +%s) - t0 )) s"
timeout ${TRAIN_S:-330} geomoe train ../shared/data -o /tmp/run/bundle -c bench/configs/gpu_speed.yaml --no-baseline > $OUT/train.log 2>&1
echo "train rc $? at $(( $(date +%s) - t0 )) s"; tail -5 $OUT/train.log
cd bench && timeout ${SPEED_S:-220} python3 speed.py --bundle /tmp/run/bundle --config configs/gpu_speed.yaml --repeat ${REPEAT:-3} --results speed_gpu 2>&1 | tee $OUT/speed.log
echo "speed done at $(( $(date +%s) - t0 )) s"
cp RESULTS.md results/speed_gpu.json $OUT/ 2>/dev/null
cd ..
# PROF_S=0 skips the profile (timeout 0 would mean no limit)
[ "${PROF_S:-60}" -gt 0 ] && timeout ${PROF_S:-60} python3 .gpu/footprint_profile.py 3 12 2>&1 | head -30
echo "all done at $(( $(date +%s) - t0 )) s"
