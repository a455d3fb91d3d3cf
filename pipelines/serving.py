"""Which network serves each region: its expert, or the single network where that did better on the region's
validation windows.

A region the k-means gives a place with too few windows for its own (a few strays among another place's many) gets
an expert fine-tuned on that other place's imagery; the single network, trained on every place for as many steps as
the generalist and all experts together, can serve it better. Each region keeps its expert unless the single
network scored a higher IoU on the validation windows routed to the region (smoothed, as prediction routes them;
each network's masks as its calibration cuts them). Chosen on validation only, after the calibration, and written
into the bundle's manifest (``serving``); prediction and evaluation run the chosen network for every tile routed
to the region, and the routing layer still records the region.
"""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.bundle import Bundle, save_manifest
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.metrics import Scores
from geomoe.pipelines.calibrate import routed_outputs
from geomoe.pipelines.evaluate import route_windows
from geomoe.pipelines.instances import footprint_mask

log = logging.getLogger(__name__)


def region_scores(bundle: Bundle, prep: Prepared, refs: list, batch_size: int = 8,
                  progress: bool = True) -> list[tuple[Scores, Scores]]:
    """Per region, the pixel scores of its expert and of the single network on the windows routed to it."""
    routes = route_windows(bundle, prep, refs, batch_size, progress=False)
    rules = bundle.calibrations("experts")
    out = [(Scores(), Scores()) for _ in range(bundle.k)]
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=batch_size), unit="batch", disable=not progress,
                  desc="expert or single network, per region"):
        i = b["index"].numpy()
        region = routes.smoothed[i]
        outputs = (routed_outputs(bundle, "experts", b["image"], region),
                   routed_outputs(bundle, "single", b["image"], region))
        truth, valid = b["mask"].numpy() > 0, b["valid"].numpy() > 0
        for j, r in enumerate(region):
            for which, channels, net in ((0, outputs[0], int(r)), (1, outputs[1], bundle.k)):
                c = rules.of(net)
                out[r][which].update(footprint_mask(channels[j], c.threshold, c.separation), truth[j], valid[j],
                                     instances=False)
    return out


def iou(s: Scores) -> float:
    """Pooled building IoU of ``s`` (0 where neither truth nor prediction has a building pixel)."""
    return s.tp / max(s.tp + s.fp + s.fn, 1)


def serving_from(scores: list[tuple[Scores, Scores]]) -> list[int]:
    """Each region's expert, or the single network (id k) where it scored the higher IoU; a region without
    validation windows keeps its expert."""
    k = len(scores)
    return [k if single.patches and iou(single) > iou(expert) else r for r, (expert, single) in enumerate(scores)]


def choose_serving(bundle: Bundle, prep: Prepared, progress: bool = True) -> list[int]:
    """Choose and write into ``bundle``'s manifest the network serving each region (every region its expert when
    the bundle has no single network, no validation windows, or ``router.single_fallback`` is off)."""
    m = bundle.manifest
    refs = prep.windows("val")
    if bundle.baseline is None or not refs or not bundle.config.router.single_fallback:
        serving = list(range(bundle.k))
        m.pop("serving_validation", None)
    else:
        scores = region_scores(bundle, prep, refs, progress=progress)
        serving = serving_from(scores)
        m["serving_validation"] = [{"windows": e.patches, "expert_iou": round(iou(e), 4), "single_iou": round(iou(s), 4)}
                                   for e, s in scores]
        for r, (e, s) in enumerate(scores):
            log.info("region %d: %s (validation IoU on its %d windows: expert %.4f, single network %.4f)", r,
                     "the single network serves it" if serving[r] == bundle.k else "its expert serves it",
                     e.patches, iou(e), iou(s))
    m["serving"] = serving
    save_manifest(bundle.root, m)
    return serving
