"""Choose how probabilities become footprints on the bundle's validation windows, never on the test split.

Three choices decide the footprints a user gets: the probability threshold, how touching buildings are cut apart
(the watershed's seeds, pipelines/instances.py, depend on how sure the boundary channel is, which varies with how
long and on what the experts trained) and the smallest footprint kept (undertrained experts leave specks that cost
building F1). Every combination is scored by building F1 at IoU 0.5 on the validation windows: the routed experts'
outputs for the experts, the single network's for the single network (so the baseline is not judged with the
experts' choice). The experts' shared choice goes into the bundle's manifest; with ``experts.calibration: each``
(the default) each expert also gets its own, scored on the validation windows routed to it: a region's resolution
and buildings set where its seeds belong (12 pixels inside a roof is 1.6 m at 0.13 m, 6.5 m at 0.54 m). ``predict``
and ``evaluate`` cut each pixel as the network that ran there chose (:class:`Calibrations`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.bundle import Bundle, BundlePaths, save_manifest
from geomoe.config import load_config
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.pipelines.evaluate import _channels, min_pixels, route_windows
from geomoe.pipelines.calibration import Calibration
from geomoe.pipelines.candidate_scores import CandidateGrid, WindowBatch, batch_counts
from geomoe.pipelines.instances import Separation
from geomoe.pipelines.pool import beside, scoring_workers

log = logging.getLogger(__name__)

# the defaults first: on a tie they stay
# The grid reaches past the choices it used to make: on seeds 0.3 / 0..8 px and areas 1..4 x, every medium bundle
# chose the largest distance, the largest area and the lower seed threshold (validation F1 still rising at the
# edge), so the grid goes on to 0.2, 16 px and 8 x.
SEPARATIONS = tuple(Separation(s, d) for s in (0.5, 0.3, 0.2) for d in (0.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0))
THRESHOLD_STEPS = (0.0, -0.1, 0.1)  # around the configured threshold
AREA_FACTORS = (1.0, 2.0, 4.0, 8.0)  # times the configured smallest footprint (4 m2 -> 8, 16, 32 m2: sheds, not specks)
# an expert whose validation windows hold fewer true buildings keeps the shared choice: too few to choose among
# 250 candidates
MIN_BUILDINGS = 100


def candidates(threshold: float, min_area_m2: float, instances: bool = True) -> list[Calibration]:
    """Every combination tried, the configured one first (once each: a smallest footprint of 0 has no multiples).
    Models without boundary and contact channels (``instances`` False) have no watershed to choose."""
    seps = SEPARATIONS if instances else (Separation(),)
    out = [Calibration(float(np.clip(round(threshold + dt, 3), 0.05, 0.95)), s, min_area_m2 * a)
           for dt, s, a in itertools.product(THRESHOLD_STEPS, seps, AREA_FACTORS)]
    return list(dict.fromkeys(out))


def routed_outputs(bundle: Bundle, which: str, images: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """(N, C, H, W) probabilities of the routed experts or the single network: the building channel, then boundary
    and contact where the models have them."""
    models = [bundle.baseline] if which == "single" else bundle.experts
    ids = np.zeros(len(images), np.int64) if which == "single" else ids
    out = np.zeros((len(images), 3 if models[0].classes >= 3 else 1, *images.shape[2:]), np.float32)
    for e in np.unique(ids):
        sel = np.flatnonzero(ids == e)
        p, aux = _channels(models[e], images[sel], bundle.device, bundle.config.predict.tta)
        out[sel] = (torch.cat([p[:, None], aux], 1) if aux is not None else p[:, None]).numpy()
    return out


def f1_of(counts: np.ndarray) -> np.ndarray:
    """Building F1 from (..., 3) counts of true positives, false positives and false negatives."""
    tp, fp, fn = np.moveaxis(counts, -1, 0)
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)


def validation_counts(bundle: Bundle, prep: Prepared, refs: list, cands: list[Calibration], which: str = "experts",
                      batch_size: int = 8, progress: bool = True, workers: int | None = None) -> np.ndarray:
    """(groups, candidates, 3) counts of matched, false and missed buildings on ``refs`` for each candidate,
    scored window by window (no window's outputs are kept, so memory does not grow with the validation set).
    ``which``: "experts" (routed as prediction routes by default, smoothed; a group per expert) or "single" (one
    group). ``workers``: processes scoring batches while the model runs on the next ones (None: as
    :func:`geomoe.pipelines.pool.scoring_workers` says; 0: in line); the counts are sums of integers, the same
    however many."""
    routes = route_windows(bundle, prep, refs, batch_size, progress=False) if which == "experts" else None
    groups = bundle.k if routes is not None else 1
    grid = CandidateGrid.of(cands)
    loader = DataLoader(GridDataset(prep, refs), batch_size=batch_size)
    if workers is None:
        workers = scoring_workers(bundle.config.predict, len(loader))

    def batches() -> Iterator[WindowBatch]:
        for b in tqdm(loader, unit="batch", disable=not progress, desc=f"calibrating footprints ({which})"):
            i = b["index"].numpy()
            group = routes.smoothed[i] if routes is not None else np.zeros(len(i), np.int64)
            yield WindowBatch(routed_outputs(bundle, which, b["image"], group), b["mask"].numpy() > 0, b["instances"].numpy(),
                              b["valid"].numpy().astype(bool), group,
                              [tuple(min_pixels(prep.readers[refs[k].scene], a) for a in grid.areas) for k in i])

    counts = np.zeros((groups, len(cands), 3), np.int64)  # TP, FP, FN
    for part in beside(workers, partial(batch_counts, grid, groups), batches()):
        counts += part
    return counts


def validation_f1(bundle: Bundle, prep: Prepared, refs: list, cands: list[Calibration], which: str = "experts",
                  batch_size: int = 8, progress: bool = True) -> list[float]:
    """Building F1 at IoU 0.5 on ``refs`` of each candidate, all groups together (:func:`validation_counts`)."""
    return f1_of(validation_counts(bundle, prep, refs, cands, which, batch_size, progress).sum(0)).tolist()


def _describe(c: Calibration) -> str:
    return (f"threshold {c.threshold:.2f}, seeds {c.separation.seed_threshold:.2f} / {c.separation.seed_distance:.0f} "
            f"px, smallest {c.min_area_m2:g} m2")


def choose(bundle: Bundle, prep: Prepared, refs: list, which: str, progress: bool
           ) -> tuple[Calibration, dict, list[dict]]:
    """The best candidate for ``which``, every candidate's validation F1, and for the experts each one's own choice
    (the shared one where its windows hold fewer than :data:`MIN_BUILDINGS` true buildings) with its figures."""
    cfg = load_config(BundlePaths(bundle.root).config)  # as trained, not as calibrated before
    model = bundle.baseline if which == "single" else bundle.experts[0]
    cands = candidates(cfg.experts.threshold, cfg.predict.min_area_m2, instances=model.classes >= 3)
    counts = validation_counts(bundle, prep, refs, cands, which, progress=progress)
    scores = f1_of(counts.sum(0))
    g = int(np.argmax(scores))  # the first of equals: the configured values stay on a tie
    best = cands[g]
    log.info("%s: footprints from %s: validation building F1 %.4f (configured values %.4f)", which, _describe(best),
             scores[g], scores[0])
    each = []
    if which == "experts":
        for e, c in enumerate(counts):
            own, buildings = f1_of(c), int(c[0, 0] + c[0, 2])  # true buildings: matched + missed
            pick = int(np.argmax(own)) if buildings >= MIN_BUILDINGS else g
            each.append({**cands[pick].as_dict(), "validation_buildings": buildings,
                         "validation_f1": round(float(own[pick]), 4), "shared_validation_f1": round(float(own[g]), 4)})
            log.info("expert %d: footprints from %s: validation building F1 %.4f on %d true buildings (shared choice "
                     "%.4f)", e, _describe(cands[pick]), own[pick], buildings, own[g])
    return best, {c.key(): round(float(f), 4) for c, f in zip(cands, scores)}, each


def calibrate(bundle: Bundle, prep: Prepared, progress: bool = True) -> Calibration | None:
    """Choose the experts' (and the single network's) calibration on the validation windows and write it into
    ``bundle``'s manifest; None (nothing written) when there are no validation windows."""
    refs = prep.windows("val")
    if not refs:
        log.warning("no validation windows: threshold, separation and smallest footprint left as configured")
        return None
    best, tried, each = choose(bundle, prep, refs, "experts", progress)
    m = bundle.manifest
    m.update(threshold=best.threshold, separation=asdict(best.separation), min_area_m2=best.min_area_m2)
    m["calibration"] = {"experts": {"validation_f1": tried}}  # the shared choice itself is the fields above
    if bundle.config.experts.calibration == "each":
        m["calibration"]["each_expert"] = each
    if bundle.baseline is not None:
        single, tried, _ = choose(bundle, prep, refs, "single", progress)
        m["calibration"]["single"] = {**single.as_dict(), "validation_f1": tried}
    m.pop("separation_validation_f1", None)  # written by earlier versions
    save_manifest(bundle.root, m)
    return best
