"""Footprints as a user gets them against the masks they come from, on a bundle's validation windows.

`geomoe evaluate` scores the separated masks. What a user opens in QGIS are polygons: outlined, specks dropped,
pinholes filled and squared by buildingregulariser. This rasterises each window's footprints back onto the window
and scores them like the masks (IoU, building F1 at IoU 0.5, boundary IoU), for the routed experts as prediction
routes them: the mask, the outlines unsquared, and squared (at two tolerances, with and without 45-degree edges)
with each fidelity guard (``predict.regularize_min_iou``: a squared outline is kept where its IoU with the mask's
outline reaches the guard, else simplified instead). It also says what share of outlines each guard keeps squared. Windows are the protocol's patches: a building cut by a
window's edge is squared against the cut, which a scene's buildings seldom are, so squaring costs less on scenes.
Chooses nothing itself: the default guard was set from its validation figures, never from the test split.
Writes bench/results/footprints.json and appends to bench/RESULTS.md.
Usage: uv run python bench/footprints.py --bundle BUNDLE [--root ../shared/data] [--split val]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import SHARED, record, write_json
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.backbone import pick_device
from geomoe.bundle import load_bundle
from geomoe.data.datasets import GridDataset, prepare
from geomoe.metrics import Scores
from geomoe.pipelines.evaluate import markdown_table, min_pixels, route_batch, route_windows
from geomoe.pipelines.footprints import rasterise_footprints, window_footprints
from geomoe.pipelines.regularise import Regularisation, outline_iou

GUARDS = (0.0, 0.85, 0.9, 0.95)
# (tolerance, parallel) in metres, the first the library's, each with edges at 45 degrees to the main direction
# allowed or not (``predict.allow_diagonals``)
SETTINGS = tuple((t, p, d) for t, p in ((0.5, 1.0), (0.25, 0.5)) for d in (False, True))


def _name(t: float, p: float, d: bool) -> str:
    return f"{t:g} / {p:g} m{', diagonals' if d else ''}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--split", default="val", help="val (the default guard's choice) or test")
    a = ap.parse_args()
    b = load_bundle(a.bundle, pick_device("auto"))
    prep = prepare(a.root, b.config.data, b.config.seed)
    refs = prep.windows(a.split)
    routes = route_windows(b, prep, refs, progress=False)
    method = "embedding" if b.config.predict.routing == "tile" else "smoothed"
    variants = {"mask": None, "outlines, not squared": None,
                **{f"squared {_name(tol, par, d)}, guard {g:g}": Regularisation(d, tol, par, g)
                   for tol, par, d in SETTINGS for g in GUARDS}}
    scores = {v: Scores() for v in variants}
    by_loc = {(v, loc): Scores() for v in variants for loc in prep.locations}
    faithful: dict = {s: [] for s in SETTINGS}  # each outline's IoU between its squared and its mask's outline
    for batch in tqdm(DataLoader(GridDataset(prep, refs), batch_size=8), unit="batch", desc="footprints"):
        i = batch["index"].numpy()
        rb = route_batch(b, batch["image"], (routes.ids[i], routes.distance[i], routes.soft_ids[i], routes.soft_w[i]))
        rb.smoothed = routes.smoothed[i]
        masks, cals = rb.method_masks(method, b.calibrations("experts"), None, None, None)
        truth, valid, ids = batch["mask"].numpy() > 0, batch["valid"].numpy().astype(bool), batch["instances"].numpy()
        for j, li in enumerate(batch["location"].tolist()):
            reader = prep.readers[refs[i[j]].scene]
            gsd = reader.target_gsd or reader.gsd
            c = cals[j]  # as the expert that ran on the window was calibrated
            small = min_pixels(reader, c.min_area_m2)
            m = masks[j] & valid[j]
            raw, t = window_footprints(m, gsd, c.min_area_m2, None, valid[j]) if gsd else (None, None)
            for v, reg in variants.items():
                if v == "mask" or gsd is None:
                    pred = m
                elif reg is None:
                    pred = rasterise_footprints(raw, t, m.shape)
                else:
                    gdf, _ = window_footprints(m, gsd, c.min_area_m2, reg, valid[j])
                    pred = rasterise_footprints(gdf, t, m.shape)
                    if reg.min_iou == 0 and len(gdf):
                        faithful[(reg.tolerance_m, reg.parallel_m, reg.diagonals)].append(
                            outline_iou(raw.geometry.to_numpy(), gdf.geometry.to_numpy()))
                for s in (scores[v], by_loc[(v, prep.locations[li])]):
                    s.update(pred & valid[j], truth[j], valid[j], min_pixels=small, truth_ids=ids[j])
    fits = {k: np.concatenate(f) if f else np.zeros(0) for k, f in faithful.items()}
    fit = fits[SETTINGS[0]]
    rows, figures = [], {"bundle": str(a.bundle), "split": a.split, "method": method, "windows": len(refs),
                         "outlines": int(len(fit)), "variants": {}}
    for v, reg in variants.items():
        s = scores[v].summary()
        f = fits[(reg.tolerance_m, reg.parallel_m, reg.diagonals)] if reg is not None else np.zeros(0)
        kept = float((f >= reg.min_iou).mean()) if reg is not None and len(f) else float("nan")
        rows.append({"footprints": v, "iou": s["iou"], "building_f1": s["building_f1"],
                     "boundary_iou": s["boundary_iou"], "squared share": kept})
        figures["variants"][v] = {**{k: round(s[k], 4) for k in ("iou", "building_f1", "boundary_iou")},
                                  "squared_share": round(kept, 3),
                                  "by_location": {loc: {k: round(by_loc[(v, loc)].summary()[k], 4)
                                                        for k in ("iou", "building_f1")} for loc in prep.locations}}
    import pandas as pd

    table = pd.DataFrame(rows).set_index("footprints")
    f1 = pd.DataFrame({v: {loc: by_loc[(v, loc)].summary()["building_f1"] for loc in prep.locations}
                       for v in variants}).rename_axis("location")
    body = (f"Routed experts ({method}), {len(refs)} {a.split} windows, {len(fit)} outlines; footprints "
            f"rasterised back onto each window and scored as the masks are (each expert's calibrated threshold and "
            f"smallest footprint; squared by buildingregulariser at a tolerance / parallel-edge distance, "
            f"and a guard). Median IoU of a squared outline with its mask's: "
            + ", ".join(f"{np.median(f) if len(f) else float('nan'):.3f} at {_name(*k)}" for k, f in fits.items())
            + ".\n\n" + markdown_table(table)
            + "\n\n**Building F1 by location**\n\n" + markdown_table(f1))
    record(f"Footprints as delivered against their masks, {a.split} split", body, f"bundle `{a.bundle}`")
    write_json("footprints", figures, {"bundle": str(a.bundle), "split": a.split})


if __name__ == "__main__":
    main()
