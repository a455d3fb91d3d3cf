"""Choose how touching buildings are cut apart on the bundle's validation windows, never on the test split.

The seeds of the watershed (pipelines/instances.py) depend on how sure the boundary channel is, which varies with
how long and on what the experts trained. Each candidate ``Separation`` cuts the routed experts' validation
outputs into buildings; the one with the best building F1 at IoU 0.5 (the footprints a user gets, after the
minimum area) is written into the bundle's manifest, which ``evaluate`` and ``predict`` then use.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.bundle import Bundle, save_manifest
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.metrics import Scores
from geomoe.pipelines.evaluate import _channels, min_pixels, route_windows
from geomoe.pipelines.instances import Separation, separate

log = logging.getLogger(__name__)

# the defaults first: on a tie they stay
CANDIDATES = tuple(Separation(s, d) for s in (0.5, 0.3) for d in (0.0, 2.0, 4.0, 6.0, 8.0))


def validation_f1(bundle: Bundle, prep: Prepared, refs: list, candidates: tuple[Separation, ...],
                  batch_size: int = 8, progress: bool = True) -> list[float]:
    """Building F1 at IoU 0.5 of the routed experts on ``refs`` under each candidate, scored batch by batch (no
    window's outputs are kept, so memory does not grow with the validation set)."""
    routes = route_windows(bundle, prep, refs, batch_size, progress=False)
    scores = [Scores() for _ in candidates]
    small = bundle.config.predict.min_area_m2
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=batch_size), desc="calibrating separation",
                  unit="batch", disable=not progress):
        i = b["index"].numpy()
        probs = np.zeros((len(i), 3, *b["image"].shape[2:]), np.float32)
        for e in np.unique(routes.ids[i]):
            sel = np.flatnonzero(routes.ids[i] == e)
            p, aux = _channels(bundle.experts[e], b["image"][sel], bundle.device)
            probs[sel] = torch.cat([p[:, None], aux], 1).numpy()
        truth, valid = b["mask"].numpy() > 0, b["valid"].numpy().astype(bool)
        for j, k in enumerate(i):
            px = min_pixels(prep.readers[refs[k].scene], small)
            for s, c in zip(scores, candidates):
                cut = separate(probs[j], bundle.threshold, c) & valid[j]
                s.update(cut, truth[j], valid[j], min_pixels=px)
    f1 = [s.summary()["building_f1"] for s in scores]
    return [0.0 if np.isnan(f) else float(f) for f in f1]


def calibrate(bundle: Bundle, prep: Prepared, candidates: tuple[Separation, ...] = CANDIDATES,
              progress: bool = True) -> Separation | None:
    """Pick the separation with the best validation building F1 and write it into ``bundle``'s manifest; None
    (nothing written) when its experts have no boundary and contact channels or there are no validation windows."""
    if not all(e.classes >= 3 for e in bundle.experts):
        return None
    refs = prep.windows("val")
    if not refs:
        log.warning("no validation windows: instance separation left at its defaults")
        return None
    scores = validation_f1(bundle, prep, refs, candidates, progress=progress)
    best = candidates[int(np.argmax(scores))]
    for c, f in zip(candidates, scores):
        log.info("  separation seed_threshold %.2f seed_distance %.0f: validation building F1 %.4f%s",
                 c.seed_threshold, c.seed_distance, f, "  <- chosen" if c == best else "")
    bundle.manifest["separation"] = asdict(best)
    bundle.manifest["separation_validation_f1"] = {f"{c.seed_threshold}/{c.seed_distance}": round(f, 4)
                                                   for c, f in zip(candidates, scores)}
    save_manifest(bundle.root, bundle.manifest)
    return best
