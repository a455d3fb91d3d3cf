#!/usr/bin/env bash
# First of two calls for the GPU quality bench (scripts/device/pack_quality.sh made .gpu): unpack the carried wheels
# and part A of the data into ignored folders of the checkout there, which stay between calls to a warm machine.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
rm -rf .gpusite .gpudata && mkdir -p .gpusite .gpudata
tar xJf .gpu/site312.tar.xz -C .gpusite || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target .gpusite .gpu/whl/*.whl || exit 1
cp -r .gpu/data/. .gpudata/ && xz -d .gpudata/*/labels.geojson.xz
export PYTHONPATH=$PWD/.gpusite
python3 -c "import rasterio, pyogrio, faiss, geopandas, segmentation_models_pytorch, umap, torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name())" || exit 1
du -sh .gpudata/*; nproc
echo "setup $(( $(date +%s) - t0 )) s"
