"""Map tiles predicted as one scene (`predict --mosaic`) against tile by tile, on a bundle's test tiles.

Folders of map tiles cut buildings at every tile border. For each location whose scenes are georeferenced tiles of
one grid, this takes the tiles whose every window lies in the test split (never used to choose anything), runs
`geomoe predict` on them as the CLI does, once tile by tile and once with `--mosaic`, and scores both sets of
footprint polygons on the stitched labels: IoU, building F1 at IoU 0.5 (true buildings from the location's
outlines where it has them), footprints, and how many true buildings the tile borders cross.
Writes bench/results/mosaic.json and appends to bench/RESULTS.md.
Usage: uv run python bench/mosaic.py --bundle BUNDLE [--root ../shared/data] [--out bench/runs/mosaic]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from common import SHARED, record, write_json
from rasterio import features
from scipy import ndimage

from geomoe.bundle import load_bundle
from geomoe.data.datasets import prepare
from geomoe.metrics import Scores
from geomoe.pipelines.evaluate import markdown_table
from geomoe.pipelines.footprints import rasterise_footprints
from geomoe.pipelines.mosaic import write_mosaic
from geomoe.raster import RasterError


def test_tiles(prep, location: str) -> list:
    """The location's scenes whose every window is a test window."""
    split_of: dict[int, set[str]] = {}
    for split in ("train", "val", "test"):
        for r in prep.windows(split):
            if prep.location_of(r) == location:
                split_of.setdefault(r.scene, set()).add(split)
    return [prep.readers[s].scene for s, sp in sorted(split_of.items()) if sp == {"test"}]


def predict(bundle: Path, tiles: list[Path], out: Path, mosaic: str | None) -> float:
    """`geomoe predict` as a user runs it; its wall time in seconds."""
    cmd = [sys.executable, "-m", "geomoe.cli", "predict", *map(str, tiles), "-b", str(bundle), "-o", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd + (["--mosaic", mosaic] if mosaic else []), check=True, capture_output=True)
    return time.perf_counter() - t0


def truth_ids(scenes: list, shape: tuple[int, int], transform, crs) -> np.ndarray | None:
    """One id per true building on the mosaic's grid, from the location's outlines (None: masks only)."""
    label = next((s.outlines or (s.label if s.label_kind == "vector" else None) for s in scenes
                  if s.outlines or s.label_kind == "vector"), None)
    if label is None:
        return None
    gdf = gpd.read_file(label).to_crs(crs)
    return features.rasterize(((g, i + 1) for i, g in enumerate(gdf.geometry)), out_shape=shape, transform=transform,
                              dtype="int32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/runs/mosaic"))
    a = ap.parse_args()
    b = load_bundle(a.bundle, "cpu")
    prep = prepare(a.root, b.config.data, b.config.seed)
    rows, figures = [], {}
    for loc in prep.locations:
        scenes = [s for s in test_tiles(prep, loc) if s.label_kind == "mask"]
        if len(scenes) < 2:
            continue
        imgs = [s.image for s in scenes]
        out = a.out / loc
        try:
            truth_vrt = write_mosaic([s.label for s in scenes], out / "truth.vrt")
        except RasterError as e:  # not tiles of one grid (no CRS, scenes of different grids): nothing to stitch
            print(f"{loc}: skipped ({e})")
            continue
        secs = {"tile by tile": predict(a.bundle, imgs, out / "each", None),
                "mosaic": predict(a.bundle, imgs, out / "one", "tiles")}
        with rasterio.open(truth_vrt) as ds:
            truth, valid, t, crs = ds.read(1) > 0, ds.read_masks(1) > 0, ds.transform, ds.crs
        ids = truth_ids(scenes, truth.shape, t, crs)
        # true buildings the tile borders cross: their pixels lie in more than one tile
        tile_of = np.zeros(truth.shape, np.int32)
        with rasterio.open(truth_vrt) as ds:
            for k, p in enumerate(imgs):
                with rasterio.open(p) as tile:
                    c, r = (round(v) for v in ~ds.transform * (tile.transform.c, tile.transform.f))
                    tile_of[r:r + tile.height, c:c + tile.width] = k
        inst = ids if ids is not None else ndimage.label(truth)[0]
        inst = np.where(truth, inst, 0)
        pairs = np.unique(np.stack([inst[inst > 0], tile_of[inst > 0]]), axis=1)
        crossing = int((np.bincount(pairs[0]) > 1).sum())
        for mode, folder in (("tile by tile", out / "each"), ("mosaic", out / "one")):
            gdf = pd.concat([gpd.read_file(f) for f in sorted(folder.glob("*_footprints.gpkg"))], ignore_index=True)
            gdf = gpd.GeoDataFrame(gdf, geometry="geometry", crs=crs)
            pred = rasterise_footprints(gdf, t, truth.shape)
            s = Scores()
            s.update(pred & valid, truth, valid, truth_ids=ids)
            sm = s.summary()
            row = {"location": loc, "footprints as": mode, "tiles": len(imgs), "true buildings": int(s.b_tp + s.b_fn),
                   "crossing a tile border": crossing, "footprints": len(gdf), "iou": sm["iou"],
                   "building_f1": sm["building_f1"], "merged": s.error_counts()["merged"],
                   "split": s.error_counts()["split"], "seconds": secs[mode]}
            rows.append(row)
            figures.setdefault(loc, {})[mode] = {k: v for k, v in row.items() if k not in ("location", "footprints as")}
        print(pd.DataFrame(rows[-2:]).to_string())
    table = pd.DataFrame(rows).set_index(["location", "footprints as"])
    body = ("Test tiles only (every window of each in the test split), predicted with `geomoe predict` as a user "
            "runs it: each tile on its own, and the same tiles with `--mosaic` (one VRT scene). Footprint polygons "
            "rasterised onto the stitched labels and scored; true buildings from the location's outlines where it "
            "has them. merged / split: true buildings under one footprint with others / under several footprints.\n\n"
            + markdown_table(table.round(4)))
    record("Map tiles as one scene (`predict --mosaic`) against tile by tile, test tiles", body, f"bundle `{a.bundle}`")
    write_json("mosaic", figures, {"bundle": str(a.bundle), "root": str(a.root)})


if __name__ == "__main__":
    main()
