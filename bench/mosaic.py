"""Map tiles predicted as one scene (`predict --mosaic`) against tile by tile, on a bundle's test tiles.

Folders of map tiles cut buildings at every tile border. For each location whose scenes are georeferenced tiles of
one grid, this takes the tiles whose every window lies in the test split (never used to choose anything), runs
`geomoe predict` on them as the CLI does, once tile by tile and once with `--mosaic`, and scores both sets of
footprint polygons on the stitched labels: IoU, building F1 at IoU 0.5 (true buildings from the location's
outlines where it has them), footprints, and how many true buildings the tile borders cross.
Without a bundle it only counts, on every labelled tile, the true buildings the tile borders cross.
Writes bench/results/mosaic.json and appends to bench/RESULTS.md.
Usage: uv run python bench/mosaic.py [--bundle BUNDLE] [--root ../shared/data] [--out bench/runs/mosaic]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from common import SHARED, record, write_json
from rasterio import features
from rasterio.transform import Affine
from scipy import ndimage

from geomoe.bundle import load_bundle
from geomoe.config import load_config
from geomoe.data.datasets import prepare
from geomoe.metrics import Scores
from geomoe.pipelines.evaluate import markdown_table
from geomoe.pipelines.footprints import rasterise_footprints
from geomoe.pipelines.mosaic import mosaic_grid, tile_info, write_mosaic
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


@dataclass
class Stitched:
    """The labels of tiles of one grid as one raster, and which tile each pixel comes from."""

    truth: np.ndarray
    valid: np.ndarray
    transform: Affine
    crs: object
    ids: np.ndarray | None  # one id per true building (None: the mask's connected components)
    tile_of: np.ndarray


def stitch(scenes: list, out: Path) -> Stitched | None:
    """The labels of ``scenes`` stitched through the mosaic's own VRT (None: not tiles of one grid)."""
    try:
        tiles = [tile_info(s.label) for s in scenes]
        grid = mosaic_grid(tiles)
    except RasterError as e:  # no CRS, or scenes of different grids: nothing to stitch
        print(f"{scenes[0].location}: not tiles of one grid ({e})")
        return None
    with rasterio.open(write_mosaic([s.label for s in scenes], out / "truth.vrt")) as ds:
        truth, valid = ds.read(1) > 0, ds.read_masks(1) > 0
    tile_of = np.zeros(truth.shape, np.int32)
    for k, (tile, (c, r)) in enumerate(zip(tiles, grid.offsets)):
        tile_of[r:r + tile.height, c:c + tile.width] = k
    return Stitched(truth, valid, grid.transform, grid.crs,
                    truth_ids(scenes, truth.shape, grid.transform, grid.crs), tile_of)


def crossing(st: Stitched, n_tiles: int) -> dict[str, int]:
    """How many true buildings the tile borders cross: their pixels lie in more than one tile, so tile by tile they
    come out as several footprints."""
    inst = np.where(st.truth, st.ids if st.ids is not None else ndimage.label(st.truth)[0], 0)
    pairs = np.unique(np.stack([inst[inst > 0], st.tile_of[inst > 0]]), axis=1)
    per_building = np.bincount(pairs[0])[np.unique(pairs[0])]
    return {"tiles": n_tiles, "buildings": int(len(per_building)), "crossing": int((per_building > 1).sum()),
            "pieces tile by tile": int(per_building.sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, help="without it, only the buildings the tile borders cross")
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/runs/mosaic"))
    a = ap.parse_args()
    cfg = load_bundle(a.bundle, "cpu").config if a.bundle else load_config("medium")
    prep = prepare(a.root, cfg.data, cfg.seed)
    labelled = [r.scene for r in prep.readers if r.scene.label_kind == "mask"]
    every, rows, figures = {}, [], {}
    for loc in prep.locations:
        scenes = [s for s in labelled if s.location == loc]
        st = stitch(scenes, a.out / loc / "all")
        if st is not None:
            every[loc] = crossing(st, len(scenes))
    md = ["**True buildings the tile borders cross, every labelled tile** (true buildings from the location's "
          "outlines where it has them, else the mask's connected components)\n\n"
          + markdown_table(pd.DataFrame(every).T.rename_axis("location"))]
    figures["every_tile"] = every
    for loc in prep.locations if a.bundle else []:
        scenes = [s for s in test_tiles(prep, loc) if s.label_kind == "mask"]
        if len(scenes) < 2 or loc not in every:
            continue
        imgs, out = [s.image for s in scenes], a.out / loc
        secs = {"tile by tile": predict(a.bundle, imgs, out / "each", None),
                "mosaic": predict(a.bundle, imgs, out / "one", "tiles")}
        st = stitch(scenes, out)
        c = crossing(st, len(scenes))
        truth, valid, t, crs, ids = st.truth, st.valid, st.transform, st.crs, st.ids
        for mode, folder in (("tile by tile", out / "each"), ("mosaic", out / "one")):
            gdf = pd.concat([gpd.read_file(f) for f in sorted(folder.glob("*_footprints.gpkg"))], ignore_index=True)
            gdf = gpd.GeoDataFrame(gdf, geometry="geometry", crs=crs)
            s = Scores()
            s.update(rasterise_footprints(gdf, t, truth.shape) & valid, truth, valid, truth_ids=ids)
            sm, err = s.summary(), s.error_counts()
            row = {"location": loc, "footprints as": mode, "tiles": len(imgs), "true buildings": err["buildings"],
                   "crossing a tile border": c["crossing"], "footprints": len(gdf), "iou": sm["iou"],
                   "building_f1": sm["building_f1"], "merged": err["merged"], "split": err["split"],
                   "seconds": secs[mode]}
            rows.append(row)
            figures.setdefault("test_tiles", {}).setdefault(loc, {})[mode] = {
                k: v for k, v in row.items() if k not in ("location", "footprints as")}
        print(pd.DataFrame(rows[-2:]).to_string())
    if rows:
        md.append("**Test tiles predicted by `geomoe predict`, tile by tile and with `--mosaic`** (tiles every window "
                  "of which is in the test split, never used to choose anything; footprint polygons rasterised onto "
                  "the stitched labels and scored; merged / split: true buildings under one footprint with others / "
                  "under several footprints)\n\n"
                  + markdown_table(pd.DataFrame(rows).set_index(["location", "footprints as"]).round(4)))
    record("Map tiles as one scene (`predict --mosaic`) against tile by tile", "\n\n".join(md),
           f"bundle `{a.bundle}`" if a.bundle else "labels only")
    write_json("mosaic", figures, {"bundle": str(a.bundle) if a.bundle else None, "root": str(a.root)})

if __name__ == "__main__":
    main()
