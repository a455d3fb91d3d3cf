"""Tried on validation: routing changes for the locations the routed experts lose to the single network.

On ../shared/data the routed experts lose at locations with too few windows for a region of their own (Austin,
Kampala): their tiles are strays in regions other locations fill. Two routing changes, neither needing a new
training run, scored on a trained bundle's validation windows (the test split is never read):

1. Local competence (dynamic classifier selection, Woods et al. 1997): for each window, the K validation windows
   nearest to it in embedding space (cosine, the window itself left out); the single network runs where it scored
   a higher pooled IoU on them than the window's routed expert. Also with that evidence pooled over each window and
   its spatial neighbours, as smoothed routing pools votes.
2. Scale-compatible routing: a window goes to the nearest region whose training windows' median ground resolution
   is within a factor of 2 of its own (all regions when none is), then smoothed as prediction smooths. Experts train
   at each location's native resolution, so a 0.75 m tile routed to an expert of 0.15 m imagery sees roofs at a
   fifth of the size it learned.

Masks are each network's probabilities at its calibrated threshold (no instance cuts): pooled IoU per location, their
mean, and overall. Usage: uv run python bench/minority_routing.py --bundle bench/runs/quality/bundle [--root DATA]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm import tqdm
from common import SHARED, record, write_json

from geomoe.bundle import BundlePaths, load_bundle
from geomoe.data.datasets import GridDataset, prepare
from geomoe.data.sampling import space_of, world_box
from geomoe.embedding.extract import Embeddings
from geomoe.embedding.model import embed_batches
from geomoe.embedding.regions import assign
from geomoe.pipelines.evaluate import markdown_table, route_batch, route_windows
from geomoe.router.smoothing import neighbours, smooth_routes

NEIGHBOURS = (4, 8, 16, 32)
SCALE_FACTOR = 2.0  # one octave: the range of scales a CNN is usually trained to tolerate (scale jitter 0.5-2)


def window_counts(bundle, prep, refs) -> dict[str, np.ndarray]:
    """Per validation window: unit embedding, nearest and smoothed region, ground resolution, place, and pixel
    intersection and union of every expert and of the single network (id k) at each one's calibrated threshold."""
    routes = route_windows(bundle, prep, refs, progress=False)
    rules, k, n = bundle.calibrations("experts"), bundle.k, len(refs)
    inter, union = np.zeros((n, k + 1)), np.zeros((n, k + 1))
    emb = np.zeros((n, bundle.router.dim), np.float32)
    loc = np.empty(n, object)
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=8), desc="validation windows", unit="batch"):
        i = b["index"].numpy()
        rb = route_batch(bundle, b["image"], (routes.ids[i], routes.distance[i], routes.soft_ids[i], routes.soft_w[i]))
        emb[i] = embed_batches(bundle.embedding, b["image"], bundle.device)
        truth, valid = b["mask"].numpy() > 0, b["valid"].numpy() > 0
        for e, p in enumerate([*rb.probs, rb.baseline]):
            pred = p.numpy() >= rules.of(e).threshold
            inter[i, e] = (pred & truth & valid).reshape(len(i), -1).sum(1)
            union[i, e] = ((pred | truth) & valid).reshape(len(i), -1).sum(1)
        loc[i] = [prep.locations[j] for j in b["location"].tolist()]
    readers = [prep.readers[r.scene] for r in refs]
    return {"emb": emb / np.linalg.norm(emb, axis=1, keepdims=True), "ids": routes.ids, "routes": routes.smoothed,
            "inter": inter, "union": union, "location": loc.astype(str),
            "gsd": np.array([r.target_gsd or r.gsd or np.nan for r in readers], float),
            "boxes": np.array([world_box(prep.readers[r.scene], r.col, r.row, r.size, r.size) for r in refs], float),
            "spaces": np.array([space_of(r) for r in readers])}


def neighbourhoods(boxes: np.ndarray, spaces: np.ndarray) -> np.ndarray:
    """(n, n) True where a window is one of another's neighbours, as smoothed routing has them."""
    out = np.zeros((len(boxes), len(boxes)), bool)
    for j, near in neighbours(boxes, spaces):
        out[j, near] = True
    return out


def evidence(w: dict, neighbours: int) -> np.ndarray:
    """(n, 4): intersection and union of each window's routed expert, then of the single network, summed over its
    ``neighbours`` nearest other validation windows."""
    sim = w["emb"] @ w["emb"].T
    np.fill_diagonal(sim, -np.inf)  # leave one out
    nn = np.argsort(-sim, 1)[:, :neighbours]
    r, k = w["routes"][:, None], w["inter"].shape[1] - 1
    return np.stack([w["inter"][nn, r].sum(1), w["union"][nn, r].sum(1), w["inter"][nn, k].sum(1),
                     w["union"][nn, k].sum(1)], 1)


def region_scales(bundle_root: Path, centroids: np.ndarray, native_gsd: dict[str, float]) -> np.ndarray:
    """Each region's median ground resolution over its training windows (each at its location's native GSD)."""
    emb = Embeddings.load(BundlePaths(bundle_root).embeddings)
    train = emb.split == "train"
    region = assign(emb.vectors[train], centroids)
    gsd = np.array([native_gsd.get(str(loc), np.nan) for loc in emb.location[train]], float)
    return np.array([np.nanmedian(gsd[region == r]) if (region == r).any() else np.nan for r in range(len(centroids))])


def scale_routes(w: dict, centroids: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Nearest region among those within :data:`SCALE_FACTOR` of each window's resolution, then smoothed."""
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    ok = np.abs(np.log(w["gsd"][:, None] / scales[None])) <= np.log(SCALE_FACTOR)
    ok[~ok.any(1)] = True  # unknown resolution, or no region near it: every region
    ids = np.where(ok, w["emb"] @ c.T, -np.inf).argmax(1)
    return smooth_routes(ids, w["boxes"], w["spaces"], k)


def scores(w: dict, ids: np.ndarray) -> dict[str, float]:
    """Pooled IoU per location, their mean, and overall, of the networks ``ids`` on the windows."""
    at = np.arange(len(ids))
    inter, union = w["inter"][at, ids], w["union"][at, ids]
    out = {loc: inter[w["location"] == loc].sum() / max(union[w["location"] == loc].sum(), 1)
           for loc in np.unique(w["location"])}
    return {**out, "mean of locations": float(np.mean(list(out.values()))), "overall": inter.sum() / max(union.sum(), 1)}


def moved(w: dict, ids: np.ndarray) -> dict[str, str]:
    """Per location, the windows whose network differs from smoothed routing's."""
    return {loc: f"{int((ids != w['routes'])[w['location'] == loc].sum())} / {int((w['location'] == loc).sum())}"
            for loc in np.unique(w["location"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=Path("bench/runs/quality/bundle"))
    ap.add_argument("--root", type=Path, default=SHARED)
    a = ap.parse_args()
    bundle = load_bundle(a.bundle)
    if bundle.baseline is None:
        raise SystemExit(f"{a.bundle}: no single network to compare with (train with --baseline)")
    prep = prepare(a.root, bundle.config.data, bundle.config.seed)
    w = window_counts(bundle, prep, prep.windows("val"))
    k, near = bundle.k, neighbourhoods(w["boxes"], w["spaces"])
    rows = {"single network": scores(w, np.full(len(w["routes"]), k)), "routed (smoothed)": scores(w, w["routes"])}
    changed = {}
    for n in NEIGHBOURS:
        ev = evidence(w, n)
        for how, e in (("tile", ev), ("neighbourhood", near.astype(float) @ ev)):
            single = e[:, 2] / np.maximum(e[:, 3], 1) > e[:, 0] / np.maximum(e[:, 1], 1)
            name = f"competence gate, K = {n}, {how}"
            rows[name] = scores(w, np.where(single, k, w["routes"]))
            changed[name] = moved(w, np.where(single, k, w["routes"]))
    scales = region_scales(a.bundle, bundle.centroids, bundle.manifest.get("native_gsd") or {})
    ids = scale_routes(w, bundle.centroids, scales, k)
    rows["scale-compatible routing (smoothed)"] = scores(w, ids)
    changed["scale-compatible routing (smoothed)"] = moved(w, ids)
    body = ("Validation IoU (pooled pixels; each network's calibrated threshold, no instance cuts); the competence "
            "gate leaves each window's own counts out of its neighbours:\n\n"
            + markdown_table(pd.DataFrame(rows).T.rename_axis("method").round(4))
            + "\n\nValidation windows whose network differs from smoothed routing's (the gate: handed to the single "
              "network):\n\n" + markdown_table(pd.DataFrame(changed).T.rename_axis("method"))
            + "\n\nRegions' median training resolution (m): " + ", ".join(f"{s:.3f}" for s in scales))
    record("Tried on validation: routing for the locations the experts lose", body,
           f"bundle `{a.bundle}`, data `{a.root}`, {len(w['routes'])} validation windows, k = {k}")
    write_json("minority_routing", {"iou": rows, "changed": changed, "region_gsd": scales.tolist()},
               {"bundle": str(a.bundle), "neighbours": list(NEIGHBOURS), "scale_factor": SCALE_FACTOR})


if __name__ == "__main__":
    main()
