"""Which network serves each region: its expert, or the single network where the region's validation windows show
the single network clearly better.

A region the k-means gives a place with too few windows for its own (a few strays among another place's many) gets
an expert fine-tuned on that other place's imagery; the single network, trained on every place for as many steps as
the generalist and all experts together, can serve it better. Each region keeps its expert unless the single
network scores a higher IoU on the validation windows routed to the region (smoothed, as prediction routes them;
each network's masks as its calibration cuts them) in at least ``router.single_fallback_confidence`` of bootstrap
resamples of those windows (a one-sided paired test; 0.95 by convention). A difference within the noise keeps the
expert: a swap moves every tile routed to the region, places the bundle never saw included (with Barnarp left out of
training, a 0.04-point lead of the single network on Banepa's region would have handed it Barnarp's tiles, which the
expert served 11 points better). Chosen on validation only, after the calibration, and written into the bundle's
manifest (``serving``); prediction and evaluation run the chosen network for every tile routed to the region, and
the routing layer still records the region.
"""

from __future__ import annotations

import logging

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.bundle import Bundle, save_manifest
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.pipelines.calibrate import routed_outputs
from geomoe.pipelines.evaluate import route_windows
from geomoe.pipelines.instances import footprint_mask

log = logging.getLogger(__name__)
RESAMPLES = 2000


def region_counts(bundle: Bundle, prep: Prepared, refs: list, batch_size: int = 8,
                  progress: bool = True) -> list[np.ndarray]:
    """Per region, (windows routed to it, 2, 3): true positive, false positive and false negative pixels of its
    expert (row 0) and of the single network (row 1) on each window."""
    routes = route_windows(bundle, prep, refs, batch_size, progress=False)
    rules = bundle.calibrations("experts")
    counts = np.zeros((len(refs), 2, 3), np.int64)
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=batch_size), unit="batch", disable=not progress,
                  desc="expert or single network, per region"):
        i = b["index"].numpy()
        region = routes.smoothed[i]
        outputs = (routed_outputs(bundle, "experts", b["image"], region),
                   routed_outputs(bundle, "single", b["image"], region))
        truth, valid = b["mask"].numpy() > 0, b["valid"].numpy() > 0
        for j, r in enumerate(region):
            t = truth[j] & valid[j]
            for which, net in ((0, int(r)), (1, bundle.k)):
                c = rules.of(net)
                p = footprint_mask(outputs[which][j], c.threshold, c.separation) & valid[j]
                counts[i[j], which] = [(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]
    return [counts[routes.smoothed == r] for r in range(bundle.k)]


def iou(counts: np.ndarray) -> np.ndarray:
    """Pooled IoU from (..., 3) true positive, false positive and false negative counts (0 where all are 0)."""
    return counts[..., 0] / np.maximum(counts.sum(-1), 1)


def single_better_share(windows: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """The share of bootstrap resamples of a region's windows (n, 2, 3) on which the single network's pooled IoU
    exceeds the expert's (0 without windows)."""
    if not len(windows):
        return 0.0
    draws = np.random.default_rng(seed).integers(0, len(windows), (resamples, len(windows)))
    pooled = windows[draws].sum(1)  # (resamples, 2, 3)
    return float((iou(pooled[:, 1]) > iou(pooled[:, 0])).mean())


def serving_of(shares: list[float], confidence: float) -> list[int]:
    """Each region's expert, or the single network (id k) where its share of resamples (:func:`single_better_share`)
    reaches ``confidence``; a region without validation windows (share 0) keeps its expert."""
    k = len(shares)
    return [k if s >= confidence else r for r, s in enumerate(shares)]


def choose_serving(bundle: Bundle, prep: Prepared, progress: bool = True) -> list[int]:
    """Choose and write into ``bundle``'s manifest the network serving each region (every region its expert when
    the bundle has no single network, no validation windows, or ``router.single_fallback`` is off)."""
    m, r_cfg = bundle.manifest, bundle.config.router
    refs = prep.windows("val")
    if bundle.baseline is None or not refs or not r_cfg.single_fallback:
        serving = list(range(bundle.k))
        m.pop("serving_validation", None)
    else:
        counts = region_counts(bundle, prep, refs, progress=progress)
        shares = [single_better_share(c) for c in counts]
        serving = serving_of(shares, r_cfg.single_fallback_confidence)
        m["serving_validation"] = []
        for r, (c, share) in enumerate(zip(counts, shares)):
            e, s = (float(iou(c.sum(0)[w])) for w in (0, 1))
            m["serving_validation"].append({"windows": len(c), "expert_iou": round(e, 4), "single_iou": round(s, 4),
                                            "single_better_share": round(share, 4)})
            if not len(c):  # nothing to weigh: the expert keeps its region
                log.info("region %d: its expert serves it (no validation window routed to it)", r)
                continue
            log.info("region %d: %s (validation IoU on its %d windows: expert %.4f, single network %.4f; the single "
                     "network ahead in %.1f %% of resamples)", r, "the single network serves it" if serving[r] ==
                     bundle.k else "its expert serves it", len(c), e, s, 100 * share)
    m["serving"] = serving
    save_manifest(bundle.root, m)
    return serving
