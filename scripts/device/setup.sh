#!/usr/bin/env bash
# First of two calls for the GPU quality bench (scripts/device/pack_quality.sh made .gpu): unpack the carried wheels
# and part A of the data into /tmp there, which stays between calls to a warm machine (ignored folders of the
# checkout did not, in session 27).
export PYTHONUNBUFFERED=1
t0=$(date +%s)
rm -rf /tmp/site /tmp/gpudata && mkdir -p /tmp/site /tmp/gpudata
tar xJf .gpu/site312.tar.xz -C /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
cp -r .gpu/data/. /tmp/gpudata/ && xz -d /tmp/gpudata/*/labels.geojson.xz
export PYTHONPATH=/tmp/site
python3 -c "import pydantic, rasterio, pyogrio, faiss, geopandas, segmentation_models_pytorch, umap, torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name())" || exit 1
du -sh /tmp/gpudata/*; nproc
echo "setup $(( $(date +%s) - t0 )) s"
