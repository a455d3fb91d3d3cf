"""A real scene end to end: predict with a trained bundle, compare with the truth, near tile borders and inside.

IoU is measured separately on pixels within --band px of a tile edge and on the rest; stitching
without seams means no drop at the borders.
Usage: uv run python bench/scene.py --bundle bench/runs/quality/bundle
       [--scene ../shared/data/banepa/scene/banepa_mosaic.tif] [--truth ..._mask.tif]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from common import SHARED, record

from geomoe.backbone import pick_device
from geomoe.bundle import load_bundle
from geomoe.pipelines.inference import BundleModel
from geomoe.pipelines.predict import predict_raster
from geomoe.pipelines.scene_plots import plot_scene
from geomoe.pipelines.tiling import TileGrid


def iou(p: np.ndarray, t: np.ndarray) -> float:
    u = (p | t).sum()
    return float((p & t).sum() / u) if u else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=Path("bench/runs/quality/bundle"))
    ap.add_argument("--scene", type=Path, default=SHARED / "banepa" / "scene" / "banepa_mosaic.tif")
    ap.add_argument("--truth", type=Path, default=SHARED / "banepa" / "scene" / "banepa_mosaic_mask.tif")
    ap.add_argument("--out", type=Path, default=Path("bench/runs/scene"))
    ap.add_argument("--band", type=int, default=8)
    a = ap.parse_args()
    b = load_bundle(a.bundle, pick_device("auto"), with_baseline=False)
    cfg = b.config.predict
    outs, st = predict_raster(BundleModel(b), a.scene, a.out, cfg, b.threshold)
    pic = plot_scene(a.scene, outs, a.out / f"{a.scene.stem}.png", a.truth)
    with rasterio.open(outs.mask) as m, rasterio.open(a.truth) as t:
        pred, valid, truth = m.read(1) == 1, m.read(1) != 255, t.read(1) > 0
    g = TileGrid(pred.shape[1], pred.shape[0], cfg.tile_size, cfg.overlap)
    edge = np.zeros(pred.shape, bool)
    for starts, axis in ((g.xs, 1), (g.ys, 0)):
        for s in starts:
            for e in (s, s + cfg.tile_size):
                lo, hi = max(0, e - a.band), min(pred.shape[axis], e + a.band)
                if axis == 1:
                    edge[:, lo:hi] = True
                else:
                    edge[lo:hi, :] = True
    edge &= valid
    inner = valid & ~edge
    body = "\n".join([
        "| pixels | share | IoU |", "|---|---|---|",
        f"| all | 100% | {iou(pred & valid, truth & valid):.4f} |",
        f"| within {a.band} px of a tile edge | {100 * edge.sum() / valid.sum():.0f}% | {iou(pred & edge, truth & edge):.4f} |",
        f"| elsewhere | {100 * inner.sum() / valid.sum():.0f}% | {iou(pred & inner, truth & inner):.4f} |", "",
        f"{pred.shape[1]}x{pred.shape[0]} px, {st.tiles} tiles in {st.seconds:.1f} s ({st.tiles / st.seconds:.1f} tiles/s), "
        f"{st.footprints} footprints, tiles per expert {dict(sorted(st.per_expert.items()))}. Picture: {pic}. "
        "The Banepa tiles of this mosaic were in the bundle's training data, so the IoU is optimistic; the "
        "border-against-interior comparison is what this measures."])
    record(f"Real scene: {a.scene.name}, IoU at tile borders", body,
           f"bundle {a.bundle} (tile {cfg.tile_size}, overlap {cfg.overlap})")


if __name__ == "__main__":
    main()
