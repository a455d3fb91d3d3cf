"""Build the small real sample the project ships (sample/) from ../shared/data.

Images are re-encoded as JPEG-in-GeoTIFF (quality 88) to fit the size budget; masks stay lossless.
Run: uv run python scripts/make_sample.py ../shared/data sample
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import rasterio
from rasterio.merge import merge

JPEG = dict(driver="GTiff", compress="JPEG", photometric="YCBCR", jpeg_quality=88, tiled=True, blockxsize=256, blockysize=256)
MASK = dict(driver="GTiff", compress="DEFLATE", tiled=True, blockxsize=256, blockysize=256)


def copy_raster(src: Path, dst: Path, opts: dict) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(src) as ds:
        prof = ds.profile | opts
        with rasterio.open(dst, "w", **prof) as out:
            out.write(ds.read())


def main(shared: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    train = out / "train"
    picks = {
        "austin": sorted((shared / "austin/images").glob("austin3_n*.tif")),  # nw, ne; sw is the unseen scene
        "banepa": sorted((shared / "banepa/images").glob("tile_19_38669[0-5]_22024[1-4].tif")),
        "kampala": sorted((shared / "kampala/images").glob("*.tif")),
    }
    for loc, images in picks.items():
        for img in images:
            copy_raster(img, train / loc / "images" / img.name, JPEG)
            copy_raster(shared / loc / "masks" / img.name, train / loc / "masks" / img.name, MASK)
    # Banepa keeps its OSM polygons too, so the vector-label path is exercised on real data.
    shutil.copy(shared / "banepa/labels.geojson", train / "banepa" / "labels.geojson")
    shutil.copy(shared / "locations.csv", train / "locations.csv")
    scenes = out / "scenes"
    scenes.mkdir(parents=True)
    copy_raster(shared / "austin/images/austin3_sw.tif", scenes / "austin3_sw.tif", JPEG)
    copy_raster(shared / "austin/masks/austin3_sw.tif", scenes / "austin3_sw_mask.tif", MASK)
    tiles = [rasterio.open(p) for p in sorted((shared / "banepa/unlabeled").glob("*.tif"))]
    mosaic, transform = merge(tiles)
    prof = tiles[0].profile | JPEG | dict(width=mosaic.shape[2], height=mosaic.shape[1], transform=transform)
    with rasterio.open(scenes / "banepa_east.tif", "w", **prof) as dst:
        dst.write(mosaic)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
