#!/usr/bin/env bash
# Packs what a lent GPU machine (no network, 64 MiB per call, Python 3.12) needs for the speed bench into .gpu/
# (ignored): the project's wheels missing there as one xz archive, and a subset of ../shared/data that fits.
# Then: device run with carry [".gpu"], command `bash .gpu/run.sh` (TRAIN_S, SPEED_S, REPEAT as in that script).
# Move docs/ and sample/train/ out of the checkout for the call (tracked files travel too), and back after.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
mkdir -p .gpu/whl /tmp/geomoe-wheels
pyver=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# rasterio 1.4.3 and pyogrio 0.10 are the smallest wheels that fit the project's needs (both carry a GDAL)
python3 -m pip download -q --no-deps "${pyver[@]}" -d /tmp/geomoe-wheels rasterio==1.4.3 pyogrio==0.10.0 \
  pyproj==3.7.2 shapely==2.2.0 geopandas==1.2.0 faiss-cpu==1.15.1 segmentation-models-pytorch==0.6.0 \
  buildingregulariser==0.2.5 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl umap-learn==0.5.12 pynndescent==0.7.0
site=$(mktemp -d)
for w in /tmp/geomoe-wheels/*.whl; do (cd "$site" && unzip -q -o "$w"); done
# one proj.db for all three (the newest, pyproj's): xz does not see copies 10 MB apart
for d in rasterio/proj_data pyogrio/proj_data; do rm "$site/$d/proj.db"; ln -s ../../pyproj/proj_dir/share/proj/proj.db "$site/$d/proj.db"; done
(cd "$site" && tar cf - . | xz -T0 -9 > "$OLDPWD/.gpu/site312.tar.xz")
rm -rf "$site"
cp scripts/device/run.sh scripts/device/mosaic.py scripts/device/footprint_profile.py .gpu/
.venv/bin/python scripts/device/data_subset.py .gpu/data
du -sh .gpu
