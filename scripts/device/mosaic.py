"""Rebuild the Banepa mosaic from its 48 tiles on the GPU machine (it does not travel: the 64 MiB limit).
Usage: mosaic.py [DATA_DIR] (default: the data folder beside this script)."""
import sys
from pathlib import Path
import rasterio
from rasterio.merge import merge
d = (Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data") / "banepa"
for sub, name in (("images", "banepa_mosaic.tif"), ("masks", "banepa_mosaic_mask.tif")):
    srcs = [rasterio.open(p) for p in sorted((d / sub).glob("*.tif"))]
    arr, t = merge(srcs)
    prof = srcs[0].profile | dict(width=arr.shape[2], height=arr.shape[1], transform=t, tiled=True,
                                  blockxsize=512, blockysize=512, compress="deflate")
    prof.pop("photometric", None); prof.pop("jpeg_quality", None)
    (d / "scene").mkdir(exist_ok=True)
    with rasterio.open(d / "scene" / name, "w", **prof) as out:
        out.write(arr)
    print(name, arr.shape)
